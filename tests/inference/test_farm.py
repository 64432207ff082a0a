"""The inference farm against real Triton Inference Servers (NVIDIA's tritonserver, CPU, mutual TLS on loopback):
the repository ``gateway triton-repo`` writes, identical masks to the local predictor on real CT, scheduling over
two servers, a server killed mid-request, every server down, certificates on both sides, a server with another
model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import structlog.testing
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from gateway.config import parse_config
from gateway.errors import InferenceError, InferenceUnavailable, VolumeError
from gateway.inference.farm import FarmObserver, TritonFarm
from gateway.inference.packages import load_model
from gateway.inference.predictor import Prediction, Predictor
from gateway.inference.remote import RemotePredictor
from gateway.inference.serving import package_digest
from gateway.inference.volume import Volume, volume_from_datasets
from gateway.inference.wire import error_text, prediction_from_result, raise_remote, request_arrays, result_array
from tests.conftest import REPO, free_port
from tests.pki import PKI
from tests.realct import real_chest_ct
from tests.synthetic import couch_phantom
from tests.triton_farm import served, server_entry, start_server, triton_local, write_repo

MODELS = REPO / "models"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, farm_repository: Path, farm_pki: PKI) -> Iterator[list[Any]]:
    """Two servers for the module (tests that kill one start their own)."""
    folder = tmp_path_factory.mktemp("triton")
    started = [start_server(farm_repository, folder, farm_pki) for _ in range(2)]
    yield started
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def phantom() -> Volume:
    volume, _ = couch_phantom(shape=(30, 160, 160), spacing=(4.0, 2.6, 2.6))
    return volume


@pytest.fixture(scope="module")
def local_on_phantom(phantom: Volume) -> Prediction:
    return Predictor(load_model(MODELS / "default")).predict(phantom)


def farm_of(entries: list[dict[str, Any]], observer: FarmObserver | None = None, **remote: Any) -> TritonFarm:
    config = parse_config({"inference": {"backend": "triton", "servers": entries, "remote": remote}})
    return TritonFarm(config.inference, observer)


class _Recorder:
    """What the farm reports to the node's metrics."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, float]] = []
        self.up: list[tuple[str, bool]] = []

    def inference_request(self, server: str, outcome: str, seconds: float) -> None:
        self.requests.append((server, outcome, seconds))

    def inference_server_up(self, server: str, up: bool) -> None:
        self.up.append((server, up))


def remote_default(farm: TritonFarm) -> RemotePredictor:
    return RemotePredictor("default", MODELS / "default", farm)


def assert_same(remote: Prediction, local: Prediction) -> None:
    assert remote.values == local.values and remote.voxels == local.voxels
    for name in local.values:
        assert np.array_equal(remote.mask(name), local.mask(name)), name
    assert remote.confidence == local.confidence and remote.split_mm == local.split_mm


def test_the_repository_holds_each_package_byte_for_byte_with_its_digest(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = subprocess.run([sys.executable, "-m", "gateway", "triton-repo", "--models-dir", str(MODELS),
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    config = (out / "default" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "kind: KIND_GPU" in config
    assert f'string_value: "{package_digest(MODELS / "default")}"' in config
    assert package_digest(out / "default" / "1" / "package") == package_digest(MODELS / "default")
    model_py = (out / "default" / "1" / "model.py").read_text()
    assert model_py == (REPO / "gateway" / "inference" / "triton_model.py").read_text()
    for name in ("HU_INT16", "HU_FLOAT32", "VOXEL_AXES", "MAX_VOXELS", "RESULT"):
        assert f'name: "{name}"' in config


def test_triton_repo_lists_every_package_it_cannot_serve(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS / "default", models / "good")
    (models / "broken").mkdir()
    (models / "broken" / "manifest.toml").write_text("[model]\nname = 'x'\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "triton-repo", "--models-dir", str(models),
                             "--out", str(tmp_path / "repo")], capture_output=True, text=True, cwd=REPO,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert "broken:" in result.stderr
    assert not (tmp_path / "repo").exists()  # nothing half-written


def test_triton_gives_the_local_predictors_masks_on_real_ct(tmp_path: Path, servers: list[Any], farm_pki: PKI) -> None:
    ct = real_chest_ct(tmp_path / "ct", source="lung2", slices=40, downsample=2)
    volume = volume_from_datasets([pydicom.dcmread(path) for path in ct.files])
    farm = farm_of([server_entry("a", servers[0].url, farm_pki)])
    local = Predictor(load_model(MODELS / "default")).predict(volume)
    assert local.voxels["External"] > 0 and local.voxels["Lung_L"] > 0
    assert_same(remote_default(farm).predict(volume), local)


def test_series_spread_over_both_servers(servers: list[Any], farm_pki: PKI, phantom: Volume,
                                         local_on_phantom: Prediction) -> None:
    farm = farm_of([server_entry(f"s{i}", server.url, farm_pki) for i, server in enumerate(servers)])
    predictor = remote_default(farm)
    before = [served(server, farm_pki) for server in servers]
    results: list[Prediction] = []
    threads = [threading.Thread(target=lambda: results.append(predictor.predict(phantom))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 4
    for result in results:
        assert_same(result, local_on_phantom)
    deadline = time.monotonic() + 10  # a server counts a request just after it replied
    counts = [served(server, farm_pki) - count for server, count in zip(servers, before, strict=True)]
    while sum(counts) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
        counts = [served(server, farm_pki) - count for server, count in zip(servers, before, strict=True)]
    assert sum(counts) == 4 and min(counts) >= 1, counts  # 2 and 2 unless a request ends before another starts
    assert farm.pool() == {"s0": "up", "s1": "up"}


def test_a_server_killed_mid_request_is_marked_down_and_the_series_retried_on_the_other(
        tmp_path: Path, farm_repository: Path, servers: list[Any], farm_pki: PKI, phantom: Volume,
        local_on_phantom: Prediction) -> None:
    slow = start_server(farm_repository, tmp_path, farm_pki, env={"CONTOUR_GW_FAILPOINT": "slow:remote_infer:4"})
    try:
        farm = farm_of([server_entry("slow", slow.url, farm_pki), server_entry("other", servers[1].url, farm_pki)])
        before = served(servers[1], farm_pki)
        outcome: list[Prediction] = []
        thread = threading.Thread(target=lambda: outcome.append(remote_default(farm).predict(phantom)))
        thread.start()
        deadline = time.monotonic() + 30
        while "failpoint_slow" not in slow.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the slow server has the request (its failpoint logged) ...
        assert _regions(slow)  # its Python backend holds the volume in shared memory ...
        slow.kill()  # ... and dies with it
        assert _regions(slow) == []  # no 256 MiB region left behind by a killed server
        thread.join(timeout=120)
        [result] = outcome
        assert_same(result, local_on_phantom)
        assert served(servers[1], farm_pki, at_least=before + 1) == before + 1
        assert farm.pool()["slow"] == "down"
    finally:
        slow.kill()


def test_a_server_that_does_not_answer_in_time_is_marked_down_and_the_series_retried_on_the_other(
        tmp_path: Path, farm_repository: Path, servers: list[Any], farm_pki: PKI, phantom: Volume,
        local_on_phantom: Prediction) -> None:
    """``timeout_seconds`` bounds a request: the stuck server (first in line) is given up after it, marked down and
    reported as failed, and the series is answered by the other server; nothing waits for the stuck one."""
    stuck = start_server(farm_repository, tmp_path, farm_pki, env={"CONTOUR_GW_FAILPOINT": "slow:remote_infer:60"})
    try:
        recorder = _Recorder()
        farm = farm_of([server_entry("stuck", stuck.url, farm_pki), server_entry("other", servers[1].url, farm_pki)],
                       recorder, timeout_seconds=5)
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            assert_same(remote_default(farm).predict(phantom), local_on_phantom)
        assert time.monotonic() - started < 40  # not the stuck server's 60 s
        [down] = [entry for entry in logs if entry["event"] == "inference_server_down"]
        assert (down["server"], down["reason"]) == ("stuck", "deadline_exceeded")
        assert farm.pool() == {"stuck": "down", "other": "up"}
        assert [(server, outcome) for server, outcome, _ in recorder.requests] == [("stuck", "failed"),
                                                                                  ("other", "ok")]
        assert recorder.requests[0][2] >= 5  # it was given its whole time
        assert ("stuck", False) in recorder.up
    finally:
        stuck.kill()


def _regions(server: Any) -> list[Path]:
    """The shared-memory regions of *server*'s Python backend that exist now."""
    return sorted(triton_local.SHARED_MEMORY.glob(f"{server.shm_prefix}*"))


def test_with_every_server_down_the_series_waits_until_one_comes_back(tmp_path: Path, farm_repository: Path,
                                                                      farm_pki: PKI, phantom: Volume,
                                                                      local_on_phantom: Prediction) -> None:
    port = free_port()
    farm = farm_of([server_entry("late", f"127.0.0.1:{port}", farm_pki)], down_seconds=0.5)
    predictor = remote_default(farm)
    with pytest.raises(InferenceUnavailable):
        predictor.predict(phantom)
    assert farm.pool() == {"late": "down"} and not farm.healthy()
    server = start_server(farm_repository, tmp_path, farm_pki, grpc_port=port)
    try:
        time.sleep(0.6)
        assert_same(predictor.predict(phantom), local_on_phantom)
        assert farm.pool() == {"late": "up"}
        assert _regions(server)
    finally:
        server.stop()
    assert _regions(server) == []  # stopped: none left either


def test_a_node_without_a_trusted_client_certificate_is_refused(servers: list[Any], farm_pki: PKI,
                                                                phantom: Volume) -> None:
    farm = farm_of([server_entry("a", servers[0].url, farm_pki, client=farm_pki.untrusted_client)])
    with pytest.raises(InferenceUnavailable):
        remote_default(farm).predict(phantom)
    client = triton.InferenceServerClient(servers[0].url, ssl=True, root_certificates=str(farm_pki.ca),
                                          channel_args=[("grpc.ssl_target_name_override", "localhost")])
    with pytest.raises(InferenceServerException):  # no client certificate at all: the handshake fails
        client.is_server_live(client_timeout=5)


@pytest.mark.parametrize("case", ["untrusted_server", "wrong_name"])
def test_a_server_that_cannot_prove_its_identity_is_not_used(case: str, tmp_path: Path, farm_repository: Path,
                                                             servers: list[Any], farm_pki: PKI, phantom: Volume,
                                                             local_on_phantom: Prediction) -> None:
    if case == "untrusted_server":  # a certificate of another CA
        impostor = start_server(farm_repository, tmp_path, farm_pki, certificate=farm_pki.untrusted)
        entry = server_entry("impostor", impostor.url, farm_pki)
    else:  # a certificate of our CA, for another name
        impostor = None
        entry = server_entry("impostor", servers[0].url, farm_pki, server_name="gpu9.hospital")
    try:
        before = served(servers[1], farm_pki)
        farm = farm_of([entry, server_entry("good", servers[1].url, farm_pki)])
        assert_same(remote_default(farm).predict(phantom), local_on_phantom)
        assert served(servers[1], farm_pki, at_least=before + 1) == before + 1
        assert farm.pool()["impostor"] == "down"
        alone = farm_of([entry])
        with pytest.raises(InferenceUnavailable):
            remote_default(alone).predict(phantom)
    finally:
        if impostor is not None:
            impostor.stop()


def test_a_server_with_another_version_of_the_model_is_not_used(tmp_path: Path, farm_pki: PKI, phantom: Volume) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS / "default", models / "default")
    manifest = models / "default" / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('version = "', 'version = "9.', 1))
    other = start_server(write_repo(tmp_path / "repo", models), tmp_path, farm_pki)
    try:
        farm = farm_of([server_entry("stale", other.url, farm_pki)])
        with pytest.raises(InferenceUnavailable):
            remote_default(farm).predict(phantom)
        assert served(other, farm_pki) == 0  # asked which model it serves, never sent a volume
    finally:
        other.stop()


def test_a_volume_the_model_refuses_fails_the_series_without_blaming_the_server(servers: list[Any], farm_pki: PKI,
                                                                                phantom: Volume) -> None:
    farm = farm_of([server_entry("a", servers[0].url, farm_pki)])
    with pytest.raises(VolumeError) as refused:
        remote_default(farm).predict(phantom, max_voxels=1000)
    assert refused.value.reason == "model_grid_too_large"
    assert farm.pool() == {"a": "up"}


def test_the_request_carries_the_volume_and_its_axes_only(phantom: Volume) -> None:
    arrays = request_arrays(phantom, 10**8)
    assert set(arrays) == {"HU_INT16", "VOXEL_AXES", "MAX_VOXELS"}
    assert np.array_equal(arrays["HU_INT16"], phantom.hu)
    assert np.array_equal(arrays["VOXEL_AXES"], phantom.affine[:3, :3])


def test_a_reply_round_trips_and_a_damaged_one_is_refused(local_on_phantom: Prediction) -> None:
    reply = result_array(local_on_phantom)
    assert_same(prediction_from_result(reply), local_on_phantom)
    damaged = np.array([bytes(reply[0])[:-100]], dtype=np.object_)
    with pytest.raises(InferenceError) as refused:
        prediction_from_result(damaged)
    assert refused.value.reason == "inference_reply_malformed"


def test_a_refusal_keeps_its_reason_code_across_the_wire() -> None:
    with pytest.raises(VolumeError) as volume:
        raise_remote("[StatusCode.INTERNAL] " + error_text(VolumeError("model_grid_too_large", "too many voxels")))
    assert volume.value.reason == "model_grid_too_large"
    with pytest.raises(InferenceError) as model:
        raise_remote(error_text(InferenceError("the output holds NaN", reason="inference_failed")))
    assert model.value.reason == "inference_failed"
    raise_remote("failed to connect to all addresses")  # not a refusal: the server's failure, nothing raised
