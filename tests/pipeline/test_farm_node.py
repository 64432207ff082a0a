"""A node with ``backend = "triton"``: real tritonserver processes (mutual TLS), dcmtk as the PACS, Orthanc as the TPS.

What a GPU server receives is captured by a recording gRPC proxy between the node and the server: every request,
its bytes and its metadata, searched for the patient's canaries, the original and the pseudonymised UIDs and the
job id. With every server down, a study waits, is sent once when one returns, and is shredded at its deadline if
none does.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from tritonclient.grpc import service_pb2

from tests.conftest import NodeProcess, canaries, free_port
from tests.orthanc import Orthanc, orthanc_running
from tests.pipeline.test_e2e import audit_records, jobs_of, route, rtstructs_of, send, tps_destination, wait_rtstruct
from tests.pki import PKI
from tests.realct import real_chest_ct
from tests.triton_farm import inference_toml, served, server_entry, start_server

_UID = re.compile(rb"[0-9]+(\.[0-9]+){3,}")
_MAX_MESSAGE = 2**31 - 1


@pytest.fixture(scope="module")
def tps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with orthanc_running(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


class RecordingProxy:
    """A gRPC proxy with the server's certificate that records every call (method, request bytes, metadata) before
    passing it on to the real server: what the server receives, exactly."""

    def __init__(self, upstream: str, farm_pki: PKI) -> None:
        self.calls: list[tuple[str, bytes, tuple[tuple[str, Any], ...]]] = []
        credentials = grpc.ssl_channel_credentials(farm_pki.ca.read_bytes(), farm_pki.client.key.read_bytes(),
                                                   farm_pki.client.certificate.read_bytes())
        sizes = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
        self._upstream = grpc.secure_channel(upstream, credentials,
                                             options=[*sizes, ("grpc.ssl_target_name_override", "localhost")])
        self._server = grpc.server(ThreadPoolExecutor(4), handlers=[_Forward(self)], options=sizes)
        pair = (farm_pki.server.key.read_bytes(), farm_pki.server.certificate.read_bytes())
        server_credentials = grpc.ssl_server_credentials([pair], root_certificates=farm_pki.ca.read_bytes(),
                                                         require_client_auth=True)
        self.url = f"127.0.0.1:{self._server.add_secure_port('127.0.0.1:0', server_credentials)}"
        self._server.start()

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls.append((method, request, tuple(context.invocation_metadata())))
        try:
            reply: bytes = self._upstream.unary_unary(method)(request, timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
        return reply

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._upstream.close()


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: RecordingProxy) -> None:
        self._proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._proxy.forward(method, request,
                                                                                                context))


def triton_node(factory: Callable[..., NodeProcess], tps: Orthanc, servers: list[dict[str, Any]], *,
                extra: str = "", env: dict[str, str] | None = None, **remote: Any) -> NodeProcess:
    return factory(destinations=[tps_destination(tps)], routes=[route("tps")],
                   extra_inference=inference_toml(servers, **remote), extra=extra, env=env)


def healthz(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    port = node.wait_for("node_started")["metrics_port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics(node: NodeProcess) -> str:
    port = node.wait_for("node_started")["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def contours(rtstruct: pydicom.Dataset) -> dict[str, list[np.ndarray]]:
    names = {roi.ROINumber: roi.ROIName for roi in rtstruct.StructureSetROISequence}
    return {names[roi.ReferencedROINumber]: [np.array(c.ContourData, dtype=float) for c in roi.ContourSequence]
            for roi in rtstruct.ROIContourSequence}


def test_the_farm_sends_the_local_rtstruct_and_the_server_sees_no_identity(
        node_factory: Callable[..., NodeProcess], tps: Orthanc, farm_pki: PKI, farm_repository: Path,
        tmp_path: Path) -> None:
    ct = real_chest_ct(tmp_path / "ct", source="lung2", slices=40, downsample=2)
    server = start_server(farm_repository, tmp_path / "triton", farm_pki)
    proxy = RecordingProxy(server.url, farm_pki)
    try:
        node = triton_node(node_factory, tps, [server_entry("gpu1", proxy.url, farm_pki)])
        send(node, ct.files)
        remote = wait_rtstruct(tps, ct.study_uid)
        job_id = node.wait_for("job_done", timeout=120)["job_id"]
        node.stop()
        local = node_factory(destinations=[tps_destination(tps)], routes=[route("tps")], data_dir=tmp_path / "local")
        send(local, ct.files)
        deadline = time.monotonic() + 180
        while len(rtstructs_of(tps, ct.study_uid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proxy.stop()
        server.stop()
    [local_rtstruct] = [ds for ds in rtstructs_of(tps, ct.study_uid) if ds.SOPInstanceUID != remote.SOPInstanceUID]
    expected, found = contours(local_rtstruct), contours(remote)
    assert list(found) == list(expected) == ["BODY", "Lung_R", "Lung_L"]
    for name, rings in expected.items():
        assert len(found[name]) == len(rings) and all(np.array_equal(a, b) for a, b in zip(found[name], rings,
                                                                                           strict=True)), name

    infers = [request for method, request, _ in proxy.calls if method.endswith("/ModelInfer")]
    assert len(infers) == 1  # one series, one request
    message = service_pb2.ModelInferRequest.FromString(infers[0])
    assert message.model_name == "default" and message.id == "" and not message.parameters
    assert [tensor.name for tensor in message.inputs] == ["HU_INT16", "VOXEL_AXES", "MAX_VOXELS"]
    wire = b"".join(request for _, request, _ in proxy.calls)
    headers = repr([metadata for _, _, metadata in proxy.calls]).encode()
    originals = [ct.study_uid, ct.series_uid, *ct.sop_uids, str(pydicom.dcmread(ct.files[0]).FrameOfReferenceUID)]
    for secret in [*canaries(ct), *originals, job_id, "2.25.", "1.2.840.10008", "DICM"]:
        assert secret.encode() not in wire and secret.encode() not in headers, secret
    del message.raw_input_contents[:]  # beside the voxels: no UID of any kind anywhere in a request
    bare = [message.SerializeToString()] + [request for method, request, _ in proxy.calls
                                            if not method.endswith("/ModelInfer")]
    assert [found.group() for request in bare for found in _UID.finditer(request)] == []
    assert not _UID.search(headers)


def test_a_server_killed_mid_request_leaves_one_rtstruct_computed_by_the_other(
        node_factory: Callable[..., NodeProcess], tps: Orthanc, farm_pki: PKI, farm_repository: Path,
        tmp_path: Path) -> None:
    ct = real_chest_ct(tmp_path / "ct", source="lung1", slices=30, downsample=4)
    slow = start_server(farm_repository, tmp_path / "slow", farm_pki,
                        env={"CONTOUR_GW_FAILPOINT": "slow:remote_infer:30"})
    other = start_server(farm_repository, tmp_path / "other", farm_pki)
    try:
        node = triton_node(node_factory, tps, [server_entry("slow", slow.url, farm_pki),
                                               server_entry("other", other.url, farm_pki)])
        send(node, ct.files)
        deadline = time.monotonic() + 60
        while "failpoint_slow" not in slow.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the first server has the series ...
        slow.kill()  # ... and dies with it
        wait_rtstruct(tps, ct.study_uid)
        assert node.wait_for("job_done", timeout=60)["state"] == "sent"
        assert served(other, farm_pki, at_least=1) == 1
    finally:
        slow.kill()
        other.stop()
    down = node.wait_for("inference_server_down")
    assert (down["server"], down["reason"]) == ("slow", "unavailable")
    time.sleep(2)
    assert len(rtstructs_of(tps, ct.study_uid)) == 1
    assert [e["event"] for e in node.events() if e["event"] == "alert"] == []  # retried at once: nothing waited
    samples = node.metrics()
    assert samples[("gateway_inference_requests_total", (("outcome", "failed"), ("server", "slow")))] == 1
    assert samples[("gateway_inference_requests_total", (("outcome", "ok"), ("server", "other")))] == 1
    assert samples[("gateway_inference_server_up", (("server", "slow"),))] == 0
    assert samples[("gateway_inference_server_up", (("server", "other"),))] == 1
    assert samples[("gateway_inference_request_seconds_count", (("server", "other"),))] == 1


def test_with_every_server_down_a_study_waits_and_is_sent_once_when_one_returns(
        node_factory: Callable[..., NodeProcess], tps: Orthanc, farm_pki: PKI, farm_repository: Path,
        tmp_path: Path) -> None:
    ct = real_chest_ct(tmp_path / "ct", source="lung1", slices=30, downsample=4)
    ports = [free_port(), free_port()]
    node = triton_node(node_factory, tps, [server_entry(f"gpu{i}", f"127.0.0.1:{port}", farm_pki)
                                           for i, port in enumerate(ports)], wait_seconds=1.0, down_seconds=0.5)
    code, health = healthz(node)  # an unreachable pool shows before any study
    assert (code, health["inference_servers"]) == (503, {"gpu0": "down", "gpu1": "down"})
    send(node, ct.files)
    waiting = node.wait_for("alert", timeout=60, outcome="waiting")
    assert waiting["stage"] == "infer" and waiting["reason"] == "inference_unavailable"
    code, health = healthz(node)
    assert code == 503 and health["checks"]["inference_servers"] is False
    assert health["inference_servers"] == {"gpu0": "down", "gpu1": "down"}
    assert re.search(r'gateway_stage_waits_total\{reason="inference_unavailable",stage="infer"\} [1-9]',
                     metrics(node))
    assert rtstructs_of(tps, ct.study_uid) == [] and len(jobs_of(node.data_dir)) == 1
    server = start_server(farm_repository, tmp_path / "triton", farm_pki, grpc_port=ports[1])
    try:
        wait_rtstruct(tps, ct.study_uid)
        assert node.wait_for("job_done", timeout=60)["state"] == "sent"
        assert healthz(node)[1]["inference_servers"]["gpu1"] == "up"
    finally:
        server.stop()
    time.sleep(2)
    assert len(rtstructs_of(tps, ct.study_uid)) == 1
    assert len([e for e in node.events() if e["event"] == "alert"]) == 1  # alerted once, not at every retry
    assert re.search(r'gateway_inference_requests_total\{outcome="ok",server="gpu1"\} 1\.0', metrics(node))


def test_with_every_server_down_past_the_deadline_the_study_is_shredded_on_time_and_nothing_sent(
        node_factory: Callable[..., NodeProcess], tps: Orthanc, farm_pki: PKI, tmp_path: Path) -> None:
    ct = real_chest_ct(tmp_path / "ct", source="lung1", slices=30, downsample=4)
    node = triton_node(node_factory, tps, [server_entry(f"gpu{i}", f"127.0.0.1:{free_port()}", farm_pki)
                                           for i in range(2)],
                       wait_seconds=1.0, down_seconds=0.5, extra="[retention]\nsweep_interval_seconds = 1")
    send(node, ct.files)
    node.wait_for("alert", timeout=60, outcome="waiting")
    node.stop()
    # Restarted with the wall clock 86 320 s ahead: the study, received seconds ago, falls due (24 h less the
    # sweep's lead of 61 s) some 15 s later; it goes on waiting for a server after the restart until shredded.
    node = node_factory(config_path=node.config_path, env={"CONTOUR_GW_FAILPOINT": "clock:86320"})
    node.wait_for("inference_unavailable", timeout=60)
    node.wait_for("job_shredded", timeout=90, why="deadline")
    deleted = [r for r in audit_records(node.data_dir) if r["event"] == "deleted"]
    assert [r["why"] for r in deleted] == ["deadline"]
    assert 86_320 < deleted[0]["age_seconds"] < 86_400  # while running, before the 24 hours
    assert not any(r["event"] == "exported" for r in audit_records(node.data_dir))
    assert jobs_of(node.data_dir) == [] and rtstructs_of(tps, ct.study_uid) == []
    assert list((node.data_dir / "spool").glob("*/*")) == []
