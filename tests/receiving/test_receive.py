"""Storage SCP against real dcmtk senders: durable byte-identical spooling, policy, duplicates, failures."""

from __future__ import annotations

import io
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from gateway.ops.process import ProcessSettings, configure_process
from tests.conftest import (
    CTSeries,
    NodeProcess,
    canaries,
    dataset_bytes,
    dcmtk_env,
    require_tool,
    spooled_by_sop,
    spooled_instances,
)


def storescu(port: int, files: list[Path], *, calling: str = "PACS", called: str = "CONTOUR_GW",
             extra: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Send *files* in this order over one association with dcmtk's storescu."""
    cmd = [require_tool("storescu"), "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def receiver_pids(node: NodeProcess) -> list[int]:
    """The node's receiver processes now, ready or still starting, whichever start method the node uses: its children
    started with ``spawn``, or the children of its ``forkserver`` (whose command line they share)."""
    group: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # the process ended
            continue
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == node.process.pid and state != "Z":
            group[int(entry.name)] = (int(ppid), cmdline)
    servers = {pid for pid, (ppid, cmdline) in group.items()
               if ppid == node.process.pid and b"multiprocessing.forkserver" in cmdline}
    return sorted(pid for pid, (ppid, cmdline) in group.items()
                  if ppid in servers or (ppid == node.process.pid and b"spawn_main" in cmdline))


def jobs_table(data_dir: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(data_dir / "gateway.db") as db:
        return db.execute("SELECT job_id, state, instance_count FROM jobs ORDER BY created_at").fetchall()


class TestStoreAndAssemble:
    def test_series_is_spooled_byte_identical_and_completes_after_quiet_period(
            self, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries]) -> None:
        node = node_factory()
        series = ct_series(12)
        result = storescu(node.port, series.files)
        assert result.returncode == 0, result.stderr
        stored = spooled_by_sop(node.data_dir)
        assert sorted(stored) == sorted(series.sop_uids)
        for source in series.files:
            uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(stored[uid]) == dataset_bytes(source)
            meta = pydicom.dcmread(io.BytesIO(stored[uid])).file_meta
            assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert meta.SourceApplicationEntityTitle == "PACS"
        completed = node.wait_for("job_complete", timeout=60)
        assert completed["instances"] == 12
        assert completed["trigger"] == "quiet_period"
        node.wait_for("job_done", timeout=60)  # no route configured: nothing to run
        assert [(state, count) for _, state, count in jobs_table(node.data_dir)] == [("no_route", 12)]
        assert not list((node.data_dir / "spool").glob("*/.*.tmp"))

    def test_three_associations_out_of_order_with_duplicates_make_one_job(
            self, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries]) -> None:
        node = node_factory(peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                    "quiet_seconds": 3}])
        series = ct_series(30)
        files = list(series.files)
        random.Random(7).shuffle(files)
        duplicates = files[:3]
        batches = [files[0:10] + duplicates[:1], files[10:20] + duplicates[1:2], files[20:30] + duplicates[2:]]
        for batch in batches:
            result = storescu(node.port, batch)
            assert result.returncode == 0, result.stderr
        stored = spooled_by_sop(node.data_dir)
        assert sorted(stored) == sorted(series.sop_uids)
        node.wait_for("job_complete", timeout=60)
        node.wait_for("job_done", timeout=60)  # no route configured: nothing to run
        assert [(state, count) for _, state, count in jobs_table(node.data_dir)] == [("no_route", 30)]

    def test_more_instances_after_completion_start_a_new_job(
            self, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries]) -> None:
        node = node_factory()
        series = ct_series(4)
        assert storescu(node.port, series.files[:2]).returncode == 0
        first = node.wait_for("job_complete", timeout=60)
        assert storescu(node.port, series.files[2:]).returncode == 0
        reopened = node.wait_for("study_received_after_completion", timeout=60)
        assert reopened["previous_job_id"] == first["job_id"]
        assert reopened["job_id"] != first["job_id"]
        node.wait_for("job_complete", timeout=15, job_id=reopened["job_id"])
        assert [count for _, _, count in jobs_table(node.data_dir)] == [2, 2]


class TestAssociationPolicy:
    @pytest.fixture
    def node(self, node_factory: Callable[..., NodeProcess]) -> NodeProcess:
        return node_factory(peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1"}])

    def test_unknown_calling_ae_is_rejected(self, node: NodeProcess, ct_series: Callable[..., CTSeries]) -> None:
        result = storescu(node.port, ct_series(2).files, calling="STRANGER")
        assert result.returncode != 0
        assert "Called AE Title Not Recognized" not in result.stderr
        assert "Calling AE Title Not Recognized" in result.stderr
        assert spooled_instances(node.data_dir) == []
        assert node.wait_for("association_rejected")["reason"] == "calling_ae_not_recognised"

    def test_wrong_called_ae_is_rejected(self, node: NodeProcess, ct_series: Callable[..., CTSeries]) -> None:
        result = storescu(node.port, ct_series(2).files, called="NOT_US")
        assert result.returncode != 0
        assert "Called AE Title Not Recognized" in result.stderr
        assert spooled_instances(node.data_dir) == []
        assert node.wait_for("association_rejected")["reason"] == "called_ae_not_recognised"

    def test_wrong_source_address_is_dropped_before_any_pdu(
            self, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries]) -> None:
        node = node_factory(peers=[{"name": "far", "ae_title": "*", "host": "10.99.0.0/16"}])
        result = storescu(node.port, ct_series(2).files)
        assert result.returncode != 0
        assert spooled_instances(node.data_dir) == []
        refused = node.wait_for("connection_refused")
        assert refused["reason"] == "address_not_allowed"
        assert not any(e.get("event") == "association_rejected" for e in node.events())

    def test_node_wide_association_limit_rejects_transiently(
            self, node_factory: Callable[..., NodeProcess]) -> None:
        node = node_factory(max_associations=2)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        held = [ae.associate("127.0.0.1", node.port, ae_title="CONTOUR_GW") for _ in range(2)]
        try:
            assert all(a.is_established for a in held)
            extra = ae.associate("127.0.0.1", node.port, ae_title="CONTOUR_GW")
            assert extra.is_rejected
            rsp = extra.acceptor.primitive
            assert (rsp.result, rsp.result_source, rsp.diagnostic) == (2, 3, 2)  # transient, local limit
            assert node.wait_for("association_rejected")["reason"] == "local_limit_exceeded"
        finally:
            for assoc in held:
                assoc.release()
        deadline = time.monotonic() + 60
        while True:  # the count drops as associations end, so a new one is accepted again
            again = ae.associate("127.0.0.1", node.port, ae_title="CONTOUR_GW")
            if again.is_established:
                again.release()
                break
            assert time.monotonic() < deadline, "the association count never dropped"
            time.sleep(0.2)

    def test_verification_is_answered_for_a_known_peer(self, node: NodeProcess) -> None:
        result = subprocess.run([require_tool("echoscu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                                 str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30)
        assert result.returncode == 0, result.stderr


class TestFailureStatuses:
    def _send(self, port: int, dataset: Dataset | Path) -> int:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="CONTOUR_GW")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(dataset)
            return int(status.Status)
        finally:
            assoc.release()

    def _dataset(self) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality = "CT"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds

    def test_missing_study_uid_is_refused(self, node_factory: Callable[..., NodeProcess],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
        monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
        node = node_factory()
        ds = self._dataset()
        del ds.StudyInstanceUID
        assert self._send(node.port, ds) == 0xC220
        ds = self._dataset()
        ds.StudyInstanceUID = "1.2.not-a-uid"
        assert self._send(node.port, ds) == 0xC220
        assert spooled_instances(node.data_dir) == []

    def test_undecodable_data_set_is_refused(self, node_factory: Callable[..., NodeProcess],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
        node = node_factory()
        # A valid File Meta group followed by bytes that are not a data set; pynetdicom sends
        # a file's data set bytes as they are.
        good = tmp_path / "good.dcm"
        ds = self._dataset()
        ds.save_as(good, enforce_file_format=True)
        raw = good.read_bytes()
        header_end = len(raw) - len(dataset_bytes(good))
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(raw[:header_end] + b"\x08\x00\x18\x00UI\xff\xff" + b"garbage" * 3)
        assert self._send(node.port, bad) == 0xC210
        assert spooled_instances(node.data_dir) == []
        assert node.wait_for("store_refused", reason="undecodable")

    def test_duplicate_is_success_and_stored_once(self, node_factory: Callable[..., NodeProcess]) -> None:
        # A quiet period no busy machine outlasts between the two associations: a copy arriving after the study
        # completed would, by design, open a new job (a study sent again is processed again).
        node = node_factory(peers=[{"name": "pacs", "ae_title": "*", "host": "127.0.0.1", "quiet_seconds": 3600}])
        ds = self._dataset()
        assert self._send(node.port, ds) == 0x0000
        assert self._send(node.port, ds) == 0x0000
        assert len(spooled_instances(node.data_dir)) == 1


class TestNoPatientDataOutside:
    def test_no_canary_in_logs_paths_or_any_file_under_data_dir(
            self, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries],
            tmp_path: Path) -> None:
        node = node_factory()  # debug logging: the most verbose sink
        series = ct_series(5)
        assert storescu(node.port, series.files).returncode == 0
        node.wait_for("job_complete", timeout=60)
        assert node.stop() == 0
        sinks = {"log": node.log_path.read_text(errors="replace"),
                 "paths": "\n".join(str(p) for p in node.data_dir.rglob("*"))}
        files = [p for p in node.data_dir.rglob("*") if p.is_file()]
        assert len(spooled_instances(node.data_dir)) == 5
        for path in files:  # spooled instances, database, WAL, keys: raw bytes, as a thief would read them
            sinks[str(path.relative_to(node.data_dir))] = path.read_bytes().decode("latin-1")
        for canary in canaries(series):
            for sink, text in sinks.items():
                assert canary not in text, f"{canary!r} leaked into {sink}"
        modes = {p.stat().st_mode & 0o777 for p in (node.data_dir / "spool").rglob("*") if p.is_file()}
        assert modes == {0o600}
        assert (node.data_dir / "spool").stat().st_mode & 0o777 == 0o700


def test_sigterm_finishes_the_transfer_in_flight(node_factory: Callable[..., NodeProcess],
                                                  ct_series: Callable[..., CTSeries]) -> None:
    node = node_factory()
    series = ct_series(60, size=256)
    cmd = [require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1", str(node.port),
           *map(str, series.files)]
    sender = subprocess.Popen(cmd, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    node.wait_for("job_created", timeout=60)
    assert node.stop() == 0
    assert sender.wait(timeout=60) == 0
    assert sorted(spooled_by_sop(node.data_dir)) == sorted(series.sop_uids)
    events = [e["event"] for e in node.events()]
    assert events.index("node_stopping") < events.index("node_stopped")


def test_completion_timer_survives_a_restart(node_factory: Callable[..., NodeProcess],
                                             ct_series: Callable[..., CTSeries]) -> None:
    node = node_factory(peers=[{"name": "pacs", "ae_title": "*", "host": "127.0.0.1", "quiet_seconds": 2}])
    assert storescu(node.port, ct_series(3).files).returncode == 0
    assert node.stop() == 0
    assert [state for _, state, _ in jobs_table(node.data_dir)] == ["receiving"]
    with sqlite3.connect(node.data_dir / "gateway.db") as db:
        [(due,)] = db.execute("SELECT last_received_at + quiet_seconds FROM jobs").fetchall()
    assert due - time.time() < 60
    while time.time() <= due:  # the quiet period ends while the node is down
        time.sleep(0.1)
    again = node_factory(config_path=node.config_path)
    completed = again.wait_for("job_complete", timeout=60)
    assert completed["trigger"] == "quiet_period"
    events = [e["event"] for e in again.events()]
    assert events.index("job_complete") < events.index("node_started"), "completed at start-up, as it was due"
    again.wait_for("job_done", timeout=60)  # no route configured: nothing to run
    assert [(state, count) for _, state, count in jobs_table(node.data_dir)] == [("no_route", 3)]


def test_a_dead_receiver_process_is_replaced(node_factory: Callable[..., NodeProcess],
                                             ct_series: Callable[..., CTSeries]) -> None:
    node = node_factory(extra_node="receive_workers = 2")
    receivers = receiver_pids(node)
    assert len(receivers) == 2
    os.kill(receivers[0], signal.SIGKILL)
    died = node.wait_for("receiver_process_died", timeout=60)
    assert died["exitcode"] == -signal.SIGKILL
    series = ct_series(4)
    for _ in range(3):  # every receiver, the replacement included, gets work
        assert storescu(node.port, series.files).returncode == 0
    assert sorted(spooled_by_sop(node.data_dir)) == sorted(series.sop_uids)


class TestFileMeta:
    @pytest.mark.parametrize("source_ae", ["PACS", "ODD_AE", "A"])
    def test_hand_encoded_meta_equals_pydicom(self, source_ae: str) -> None:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info
        from pydicom.uid import JPEGLSLossless

        from gateway.receiving.storage_scp import (
            IMPLEMENTATION_CLASS_UID,
            IMPLEMENTATION_VERSION_NAME,
            Identity,
            file_meta_bytes,
        )

        identity = Identity(CTImageStorage, "1.2.3.45", "1.2.3", "1.2.3.4")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = "1.2.3.45"
        meta.TransferSyntaxUID = JPEGLSLossless
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        meta.SourceApplicationEntityTitle = source_ae
        expected = DicomBytesIO()
        expected.is_little_endian, expected.is_implicit_VR = True, False
        write_file_meta_info(expected, meta, enforce_standard=True)
        assert file_meta_bytes(identity, JPEGLSLossless, source_ae) == b"\0" * 128 + b"DICM" + expected.getvalue()


class TestResponseEncoding:
    @pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210, 0xB000])
    @pytest.mark.parametrize("instance_uid", ["1.2.3.4", "1.2.3.45"])  # even and odd lengths
    def test_direct_c_store_response_equals_pynetdicom(self, status: int, instance_uid: str) -> None:
        from pynetdicom.dimse_messages import C_STORE_RSP
        from pynetdicom.dimse_primitives import C_STORE

        from gateway.receiving.commands import encode_c_store_response

        response = C_STORE()
        response.MessageIDBeingRespondedTo = 7
        response.AffectedSOPClassUID = CTImageStorage
        response.AffectedSOPInstanceUID = instance_uid
        response.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(response)
        [pdata] = list(message.encode_msg(1, 16_384))
        [(context_id, value)] = pdata.presentation_data_value_list
        assert context_id == 1
        assert value == b"\x03" + encode_c_store_response(response)


def test_received_data_sets_never_go_to_plaintext_temporary_files() -> None:
    before = ProcessSettings.snapshot()
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    os.umask(0o022)
    configure_process()
    umask = os.umask(0o022)
    assert pynetdicom_config.STORE_RECV_CHUNKED_DATASET is False and umask == 0o077
    assert pynetdicom_config.LOG_REQUEST_IDENTIFIERS is False and pynetdicom_config.LOG_RESPONSE_IDENTIFIERS is False
    before.restore()  # what the autouse fixture does after every test
    umask = os.umask(before.umask)
    assert umask == before.umask and pynetdicom_config.STORE_RECV_CHUNKED_DATASET is before.pynetdicom[
        "STORE_RECV_CHUNKED_DATASET"]
