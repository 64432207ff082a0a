"""Patient identity: one Study Instance UID never mixes two patients, a corrected re-send wins, names come back
byte for byte, and a job that takes the node down is not retried forever.

Real node processes, dcmtk storescu as the PACS (one or two peers), Orthanc as the TPS.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from gateway.identity.pseudonymise import identity_of, patient_of
from gateway.store.spool import Spool
from tests.conftest import (
    CANARY_STUDY_PREFIX,
    REPO,
    CTSeries,
    NodeProcess,
    canaries,
    write_config,
)
from tests.orthanc import Orthanc, orthanc_running
from tests.pipeline.test_e2e import (
    audit_records,
    complete_now,
    jobs_of,
    phantom,
    route,
    rtstructs_of,
    send,
    status,
    tps_destination,
    wait_rtstruct,
)
from tests.realct import real_chest_ct, real_head_ct
from tests.synthetic import ct_slice

PATIENT_A = ("ALPHA^CANARY", "ALPHA77")
PATIENT_B = ("BRAVO^CANARY", "BRAVO88")


@pytest.fixture(scope="module")
def tps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with orthanc_running(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


def _two_peers() -> list[dict[str, Any]]:
    """Two peers whose studies complete only by hand (:func:`complete_now`): a quiet period that no gap between
    two associations outlasts, however busy the machine."""
    return [{"name": name.lower(), "ae_title": name, "host": "127.0.0.1", "quiet_seconds": 3600}
            for name in ("PACS_A", "PACS_B")]


def _no_phi(node: NodeProcess, report: str, *series: CTSeries) -> None:
    texts = {"log": node.log_text(), "status": report}
    values = [value for ct in series for value in canaries(ct)] + [*PATIENT_A, *PATIENT_B]
    assert [(v, sink) for v in values for sink, text in texts.items() if v in text] == []


def _conflicting_studies(tmp_path: Path) -> dict[str, tuple[CTSeries, CTSeries]]:
    """Two patients under one Study UID, per way of arriving; the last pair is real CT (a chest and a head)."""
    studies = {}
    for how in ("one_association", "two_associations", "two_peers"):
        study_uid = generate_uid(prefix=CANARY_STUDY_PREFIX + ".")
        studies[how] = (phantom(tmp_path / how / "a", study_uid=study_uid, patient=PATIENT_A),
                        phantom(tmp_path / how / "b", study_uid=study_uid, patient=PATIENT_B))
    study_uid = generate_uid(prefix=CANARY_STUDY_PREFIX + ".")
    studies["real_ct_two_peers"] = (
        real_chest_ct(tmp_path / "chest", patient=(*PATIENT_A, "19400101"), study_uid=study_uid, slices=16,
                      downsample=4),
        real_head_ct(tmp_path / "head", patient=(*PATIENT_B, "19500202"), study_uid=study_uid, slices=16,
                     downsample=2))
    return studies


def _send_pair(node: NodeProcess, how: str, a: CTSeries, b: CTSeries) -> None:
    if how == "one_association":
        send(node, [*a.files, *b.files], "PACS_A")
    elif how == "two_associations":
        send(node, a.files, "PACS_A")
        send(node, b.files, "PACS_A")
    else:  # two peers at once
        senders = [threading.Thread(target=send, args=(node, ct.files, ae)) for ct, ae in ((a, "PACS_A"),
                                                                                          (b, "PACS_B"))]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()


def test_two_patients_under_one_study_uid_send_nothing(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                                       tmp_path: Path) -> None:
    """On one association, on two, and from two peers (phantoms, then real CT): the job fails closed."""
    studies = _conflicting_studies(tmp_path)
    node = node_factory(peers=_two_peers(), destinations=[tps_destination(tps)], routes=[route("tps")])
    jobs = []
    for how, (a, b) in studies.items():
        _send_pair(node, how, a, b)
        job_id = node.wait_for("job_created", timeout=60)["job_id"]
        complete_now(node, job_id)
        done = node.wait_for("job_done", timeout=120, job_id=job_id)
        assert (done["state"], done["reason"]) == ("failed", "identity_conflict"), how
        alert = node.wait_for("alert", job_id=job_id)
        assert (alert["stage"], alert["reason"]) == ("pseudonymise", "identity_conflict"), how
        jobs.append(job_id)
        node.log_offset = node.log_path.stat().st_size  # the next study's events only
    node.log_offset = 0
    assert jobs_of(node.data_dir) == [(job_id, "failed", "identity_conflict") for job_id in jobs]
    assert not list((node.data_dir / "work").glob("*/*.dcm")), "nothing of a conflicting study is pseudonymised"
    assert not list((node.data_dir / "vault").glob("*"))
    records = [r for r in audit_records(node.data_dir) if r["event"] == "pseudonymised"]
    assert [(r["job_id"], r["outcome"], r["reason"]) for r in records] == [
        (job_id, "failed", "identity_conflict") for job_id in jobs]
    report = status(node)
    assert report.count("identity_conflict") == len(jobs)
    # Every job ended (job_done, failed) before its send stage started, and there is no other job: nothing was sent.
    assert [e for e in node.events() if e["event"] == "stage_started" and e.get("stage") == "send"] == []
    assert [rtstructs_of(tps, a.study_uid) for a, _ in studies.values()] == [[]] * len(studies)
    _no_phi(node, report, *(ct for pair in studies.values() for ct in pair))

    # The check compares patients, not senders: one patient's two series from two peers are contoured.
    study_uid = generate_uid(prefix=CANARY_STUDY_PREFIX + ".")
    same = [phantom(tmp_path / f"same{n}", study_uid=study_uid, patient=PATIENT_A, series_description=f"Thorax {n}")
            for n in (1, 2)]
    node.log_offset = node.log_path.stat().st_size
    _send_pair(node, "two_peers", *same)
    job_id = node.wait_for("job_created", timeout=60)["job_id"]
    complete_now(node, job_id)
    assert node.wait_for("job_done", timeout=180, job_id=job_id)["state"] == "sent"
    found = rtstructs_of(tps, study_uid)
    assert len(found) == 2 and {str(ds.PatientID) for ds in found} == {PATIENT_A[1]}


def test_real_ct_corrected_after_delivery_carries_the_corrected_patient(
        node_factory: Callable[..., NodeProcess], tps: Orthanc, tmp_path: Path) -> None:
    """A real CT sent under the wrong patient, delivered, then re-sent corrected (patient reconciliation)."""
    ct = real_chest_ct(tmp_path / "wrong", patient=(*PATIENT_B, "19500202"), slices=16, downsample=4)
    corrected = _rename(ct, tmp_path / "right", PATIENT_A)
    node = node_factory(destinations=[tps_destination(tps)], routes=[route("tps")],
                        extra="[retention]\nkeep_after_delivery_seconds = 3600")
    send(node, ct.files)
    first = wait_rtstruct(tps, ct.study_uid)
    job_id = node.wait_for("job_done", timeout=60)["job_id"]
    send(node, corrected)
    reopened = node.wait_for("job_reopened", timeout=60)
    assert (reopened["job_id"], reopened["reason"]) == (job_id, "instance_corrected")
    deadline = time.monotonic() + 180
    while len(rtstructs_of(tps, ct.study_uid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    [second] = [ds for ds in rtstructs_of(tps, ct.study_uid) if ds.SOPInstanceUID != first.SOPInstanceUID]
    assert (str(first.PatientID), str(second.PatientID)) == (PATIENT_B[1], PATIENT_A[1])
    assert str(second.PatientName) == PATIENT_A[0]
    refs = {image.ReferencedSOPInstanceUID for image in second.ReferencedFrameOfReferenceSequence[0]
            .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    assert refs == set(ct.sop_uids)
    assert [job for job, _, _ in jobs_of(node.data_dir)] == [job_id]  # the same job, processed again
    assert len(Spool(node.data_dir).file_ids(job_id)) == len(ct.files)  # replaced, not added
    _no_phi(node, status(node), ct)


def _rename(ct: CTSeries, folder: Path, patient: tuple[str, str]) -> list[Path]:
    """The same instances (same SOP Instance UIDs) as a PACS re-sends them after patient reconciliation."""
    folder.mkdir()
    out = []
    for path in ct.files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = patient
        out.append(folder / path.name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def test_corrected_resend_before_pseudonymisation_replaces(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                                           tmp_path: Path) -> None:
    ct = phantom(tmp_path / "wrong", patient=PATIENT_B)
    corrected = _rename(ct, tmp_path / "right", PATIENT_A)
    peers = [{"name": "pacs", "ae_title": "*", "host": "127.0.0.1", "quiet_seconds": 3600}]  # completed by hand
    node = node_factory(peers=peers, destinations=[tps_destination(tps)], routes=[route("tps")])
    send(node, ct.files)
    send(node, corrected)
    send(node, corrected)  # the same corrected copy again: a duplicate, not a replacement
    complete_now(node, node.wait_for("job_created", timeout=60)["job_id"])  # all three sends came while receiving
    rtstruct = wait_rtstruct(tps, ct.study_uid)
    node.wait_for("job_done", timeout=60)
    assert (str(rtstruct.PatientName), str(rtstruct.PatientID)) == PATIENT_A
    events = node.events()
    assert sum(e["event"] == "instance_replaced" for e in events) == len(ct.files)
    assert sum(e["event"] == "job_created" for e in events) == 1
    assert len(rtstructs_of(tps, ct.study_uid)) == 1
    _no_phi(node, status(node), ct)


def test_corrected_resend_while_the_study_is_processed_restarts_it(
        node_factory: Callable[..., NodeProcess], tps: Orthanc, tmp_path: Path) -> None:
    """Pseudonymised, then held up before inference (a slow stage): the corrected copies reopen the job, the
    series in progress is dropped without an alert, and the TPS receives one RTSTRUCT, of the right patient."""
    ct = phantom(tmp_path / "wrong", patient=PATIENT_B)
    corrected = _rename(ct, tmp_path / "right", PATIENT_A)
    node = node_factory(destinations=[tps_destination(tps)], routes=[route("tps")],
                        env={"CONTOUR_GW_FAILPOINT": "slow:before:infer:4"})
    send(node, ct.files)
    job_id = node.wait_for("stage_done", stage="pseudonymise", timeout=120)["job_id"]
    send(node, corrected)
    assert node.wait_for("job_reopened", timeout=60)["job_id"] == job_id
    rtstruct = wait_rtstruct(tps, ct.study_uid)
    node.wait_for("job_done", timeout=60, state="sent")
    assert (str(rtstruct.PatientName), str(rtstruct.PatientID)) == PATIENT_A
    assert len(rtstructs_of(tps, ct.study_uid)) == 1
    events = node.events()
    assert [e["reason"] for e in events if e["event"] == "job_gone"] == ["reopened"]
    assert not [e for e in events if e["event"] in ("alert", "job_error")]
    assert sum(e["event"] == "instance_replaced" for e in events) == len(ct.files)
    assert [job for job, _, _ in jobs_of(node.data_dir)] in ([job_id], [])  # shredded once delivered
    _no_phi(node, status(node), ct)


# Names whose bytes any decode/encode round trip would change.
_NAMES = {
    "utf8_invalid": ("ISO_IR 192", b"M\xfcller^J\xc3\xbcrgen"),  # a Latin-1 byte under UTF-8, then UTF-8
    "gb18030_padded": ("GB18030", "王^小明".encode("gb18030") + b" "),
    "nul_padded": ("", b"NULPAD^CANARY\0"),
}


def _study_with_name(folder: Path, charset: str, name: bytes) -> CTSeries:
    """A phantom whose Patient's Name is *name*, as bytes a modality wrote (pydicom would re-encode them)."""
    ct = phantom(folder)
    placeholder = b"Q" * len(name)
    for path in ct.files:
        ds = pydicom.dcmread(path)
        if charset:
            ds.SpecificCharacterSet = charset
        ds.PatientName = placeholder.decode()
        ds.save_as(path, enforce_file_format=True)
        raw = path.read_bytes()
        assert raw.count(placeholder) == 1
        path.write_bytes(raw.replace(placeholder, name))
    return ct


def test_names_come_back_byte_for_byte(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                       tmp_path: Path) -> None:
    studies = {key: _study_with_name(tmp_path / key, charset, name) for key, (charset, name) in _NAMES.items()}
    node = node_factory(destinations=[tps_destination(tps)], routes=[route("tps")])
    for ct in studies.values():
        send(node, ct.files)
    for key, ct in studies.items():
        rtstruct = wait_rtstruct(tps, ct.study_uid)
        stored = tps.file_of(str(rtstruct.SOPInstanceUID))
        charset, name = _NAMES[key]
        received = pydicom.dcmread(io.BytesIO(stored))
        assert received.get_item(0x00100010).value == name, key
        if charset:
            assert received.SpecificCharacterSet == charset, key


class TestPatientOf:
    def _ds(self, **values: Any) -> Dataset:
        ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.5", 0, 4, np.random.default_rng(0))
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return pydicom.dcmread(_encoded(ds))

    def test_padding_and_empty_components_are_the_same_patient(self) -> None:
        assert patient_of(self._ds(PatientName="DOE^JOHN")) == patient_of(self._ds(PatientName="DOE^JOHN^^^ "))

    @pytest.mark.parametrize("keyword", ["PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate"])
    def test_each_attribute_tells_patients_apart(self, keyword: str) -> None:
        value = "19700101" if keyword == "PatientBirthDate" else "OTHER"
        assert patient_of(self._ds(**{keyword: value})) != patient_of(self._ds())

    def test_absent_and_empty_are_the_same(self) -> None:
        assert patient_of(self._ds(IssuerOfPatientID="")) == patient_of(self._ds())

    def test_identity_keeps_raw_bytes(self) -> None:
        ds = self._ds()
        ds[0x00100010] = RawDataElement(Tag(0x00100010), "PN", 8, b"A\xff^B\0\0\0\0", 0, False, True)
        encoded = identity_of(ds)
        assert b"PN\x08\x00A\xff^B\0\0\0\0" in encoded


def _encoded(ds: Dataset) -> io.BytesIO:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def test_a_slow_write_neither_completes_nor_splits_its_study(node_factory: Callable[..., NodeProcess],
                                                             tmp_path: Path) -> None:
    """Each instance takes 2 s to become durable; the quiet period (1 s) counts from the end of the write."""
    ct = phantom(tmp_path / "ct")
    node = node_factory(env={"CONTOUR_GW_FAILPOINT": "slow:write_instance:2"})
    send(node, ct.files[:3])
    node.wait_for("job_complete", timeout=120)
    events = node.events()
    assert sum(e["event"] == "job_created" for e in events) == 1
    assert not any(e["event"] == "study_received_after_completion" for e in events)
    [(job_id, _, _)] = jobs_of(node.data_dir)
    complete = next(e for e in events if e["event"] == "job_complete")
    assert (complete["job_id"], complete["instances"]) == (job_id, 3)


def _cgroup(tmp_path: Path, limit_bytes: int) -> Path:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").exists():
        root = Path("/sys/fs/cgroup")  # cgroup v2
    group = root / f"contour-gw-test-{os.getpid()}-{tmp_path.name}"
    try:
        group.mkdir()
        if (group / "memory.limit_in_bytes").exists():
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = group / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit_bytes))
        else:
            (group / "memory.max").write_text(str(limit_bytes))
            (group / "memory.swap.max").write_text("0")
    except OSError as exc:
        pytest.fail(f"cannot create a memory cgroup for the OOM test ({exc}); the tests run as root")
    return group


def _empty(group: Path) -> None:
    """Kill whatever still runs in *group* (a node and its receivers after a failed assertion)."""
    deadline = time.monotonic() + 10
    while (pids := (group / "cgroup.procs").read_text().split()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)


def _start_in(group: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CONTOUR_GW_FAILPOINT": "oom:before:infer"}
    with log.open("ab") as out:
        return subprocess.Popen(
            ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$0" "$@"', sys.executable, "-m", "gateway",
             "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            start_new_session=True)


def test_a_job_the_oom_killer_ends_is_failed_after_three_tries(tmp_path: Path) -> None:
    """A model that exhausts memory: the kernel kills the node (cgroup limit) at every try; restarted by its
    supervisor, the node gives the job up after three attempts instead of dying forever."""
    ct = phantom(tmp_path / "ct")
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var", destinations=[{"name": "folder",
                          "type": "folder"}], routes=[route("folder")], extra_node="receive_workers = 1")
    group = _cgroup(tmp_path, 1024 * 1024**2)
    log = tmp_path / "node.log"
    try:
        kills = 0
        for attempt in range(4):
            process = _start_in(group, config, log)
            node = NodeProcess(config, log, process, data_dir=tmp_path / "var",
                               log_offset=log.stat().st_size if log.exists() else 0)
            started = node.wait_for("node_started", timeout=60)
            if attempt == 0:
                node.port = int(started["port"])
                send(node, ct.files)
            if attempt < 3:
                assert process.wait(timeout=120) == -9, "the OOM killer ends the node"
                node.kill9()  # its receiver processes
                kills += 1
                continue
            done = node.wait_for("job_done", timeout=60)
            assert (done["state"], done["reason"]) == ("failed", "series 1: crashed_repeatedly")
            alert = node.wait_for("alert", reason="crashed_repeatedly")
            assert alert["attempts"] == 3
            assert not any(e["event"] == "failpoint_oom" for e in node.events()), "not tried a fourth time"
            report = status(node)
            assert "crashed_repeatedly" in report
            node.stop()
        assert kills == 3
        oom_kills = [line for line in (group / "memory.oom_control").read_text().splitlines()
                     if line.startswith("oom_kill ")] if (group / "memory.oom_control").exists() else []
        assert not oom_kills or int(oom_kills[0].split()[1]) >= 3
    finally:
        _empty(group)
        group.rmdir()
    assert not (tmp_path / "var" / "export").exists()
