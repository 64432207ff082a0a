"""End to end: dcmtk storescu as the PACS, a real node, Orthanc as the TPS.

A CT phantom with canary identity goes in; the RTSTRUCT the TPS stores must point at the
original CT, carry the original identity, pass dciodvfy, and name the structures as the site
template says. Outages, rejections, crashes at every stage and concurrent peers must still
end with exactly one RTSTRUCT per study at the TPS, or a clear reason why none was sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tests.conftest import REPO, CTSeries, NodeProcess, canaries, dcmtk_env, require_tool, start_node
from tests.orthanc import Orthanc, orthanc_running, start_orthanc
from tests.synthetic import couch_phantom, write_volume_series

PHANTOM_SHAPE, PHANTOM_SPACING = (30, 160, 160), (4.0, 2.6, 2.6)
TEMPLATE = {"External": {"name": "BODY", "order": 1, "colour": [255, 128, 0]},
            "Lung_R": {"name": "Lung_R", "order": 2}, "Lung_L": {"name": "Lung_L", "order": 3}}
STAGES = ["pseudonymise", "infer", "structure", "reidentify", "send"]


@pytest.fixture(scope="module")
def tps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the module; tests tell their studies apart by Study Instance UID."""
    with orthanc_running(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


def phantom(folder: Path, **kwargs: Any) -> CTSeries:
    volume, _ = couch_phantom(shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    return write_volume_series(folder, volume, **kwargs)


def tps_destination(orthanc: Orthanc, **retry: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "tps", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    if retry:
        entry["retry"] = retry
    return entry


def route(*destinations: str, **extra: Any) -> dict[str, Any]:
    return {"name": "thorax", "match": {"Modality": "CT"}, "model": "default", "destinations": list(destinations),
            "structures": TEMPLATE, **extra}


def send(node: NodeProcess, files: list[Path], calling_ae: str = "PACS") -> None:
    result = subprocess.run([require_tool("storescu"), "-aet", calling_ae, "-aec", "CONTOUR_GW", "127.0.0.1",
                             str(node.port), *map(str, files)], capture_output=True, text=True, env=dcmtk_env(),
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def rtstructs_of(orthanc: Orthanc, study_uid: str) -> list[Dataset]:
    return [ds for ds in orthanc.datasets(modality="RTSTRUCT") if ds.StudyInstanceUID == study_uid]


def wait_rtstruct(orthanc: Orthanc, study_uid: str, timeout: float = 180.0) -> Dataset:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = rtstructs_of(orthanc, study_uid)
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError("no RTSTRUCT for the study at the TPS:\n" + orthanc.log_text()[-3000:])


def jobs_of(data_dir: Path) -> list[tuple[str, str, str | None]]:
    import sqlite3

    with sqlite3.connect(data_dir / "gateway.db") as db:
        return list(db.execute("SELECT job_id, state, reason FROM jobs ORDER BY created_at"))


def audit_records(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data_dir / "audit" / "audit.jsonl").read_text().splitlines()]


def complete_now(node: NodeProcess, job_id: str) -> None:
    """Close a receiving job at once (``python -m gateway complete``) rather than when its quiet period ends.

    For tests whose peers have a long quiet period so that every instance sent, over several associations
    or across a restart, joins the job however slowly a busy machine sends it.
    """
    forced = subprocess.run([sys.executable, "-m", "gateway", "complete", "--config", str(node.config_path), job_id],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert forced.returncode == 0, forced.stderr


def sent_once_then_shredded(node: NodeProcess) -> None:
    """Exactly one job, delivered once, then shredded on delivery: the audit trail says so, the table is empty."""
    node.wait_for("job_shredded", timeout=60, why="delivered")
    data_dir = node.data_dir
    records = audit_records(data_dir)
    assert len({r["job_id"] for r in records}) == 1
    assert [r["outcome"] for r in records if r["event"] == "exported"] == ["sent"]
    assert [(r["state"], r["why"]) for r in records if r["event"] == "deleted"] == [("sent", "delivered")]
    assert jobs_of(data_dir) == []


def ui_values(ds: Dataset) -> list[str]:
    values = []
    for element in [*ds.iterall(), *ds.file_meta]:
        if element.VR == "UI" and element.value:
            items = element.value if isinstance(element.value, MultiValue | list) else [element.value]
            values += [str(v) for v in items]
    return values


def status(node: NodeProcess) -> str:
    result = subprocess.run([sys.executable, "-m", "gateway", "status", "--config", str(node.config_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_full_path_to_orthanc(node_factory: Callable[..., NodeProcess], tps: Orthanc, tmp_path: Path) -> None:
    ct = phantom(tmp_path / "ct")
    node = node_factory(destinations=[tps_destination(tps), {"name": "folder", "type": "folder"}],
                        routes=[route("tps", "folder")], extra="[retention]\nkeep_after_delivery_seconds = 3600")
    send(node, ct.files)
    rtstruct = wait_rtstruct(tps, ct.study_uid)
    done = node.wait_for("job_done", timeout=60)
    assert done["state"] == "sent"

    original = pydicom.dcmread(ct.files[0])
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert rtstruct[keyword].value == original[keyword].value, keyword
    contour_refs = [image.ReferencedSOPInstanceUID for roi in rtstruct.ROIContourSequence
                    for contour in roi.ContourSequence for image in contour.ContourImageSequence]
    series_refs = [image.ReferencedSOPInstanceUID for image in rtstruct.ReferencedFrameOfReferenceSequence[0]
                   .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence]
    assert contour_refs and set(contour_refs) <= set(ct.sop_uids)
    assert sorted(series_refs) == sorted(ct.sop_uids)
    own = {rtstruct.SOPInstanceUID, rtstruct.SeriesInstanceUID, rtstruct.file_meta.ImplementationClassUID}
    known = {*ct.sop_uids, ct.study_uid, ct.series_uid, str(original.FrameOfReferenceUID), *own}
    unknown = [uid for uid in ui_values(rtstruct) if uid not in known and not uid.startswith("1.2.840.10008.")]
    assert unknown == [], "a UID that is neither original, ours, nor a standard one (a pseudo UID?)"
    assert not any(uid.startswith("2.25.") for uid in ui_values(rtstruct))
    assert "PatientIdentityRemoved" not in rtstruct and "DeidentificationMethod" not in rtstruct
    assert [roi.ROIName for roi in rtstruct.StructureSetROISequence] == ["BODY", "Lung_R", "Lung_L"]
    assert list(rtstruct.ROIContourSequence[0].ROIDisplayColor) == [255, 128, 0]

    stored = tmp_path / "rtstruct.dcm"
    stored.write_bytes(tps.file_of(str(rtstruct.SOPInstanceUID)))
    verdict = subprocess.run([require_tool("dciodvfy"), str(stored)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert [line for line in verdict.stderr.splitlines() if line.startswith("Error")] == [], verdict.stderr

    [exported] = (node.data_dir / "export" / "folder").glob("*.dcm")
    assert pydicom.dcmread(exported).SOPInstanceUID == rtstruct.SOPInstanceUID
    assert oct(exported.stat().st_mode & 0o777) == "0o600"

    events = node.events()
    stages = [e["stage"] for e in events if e["event"] == "stage_done"]
    assert stages == STAGES
    # read and pseudonymised while the study arrived and during its quiet period, then only stored by the stage
    [pseudonymised] = [e for e in events if e["event"] == "stage_done" and e["stage"] == "pseudonymise"]
    assert pseudonymised["prepared"] == pseudonymised["instances"] == len(ct.files)
    assert [e["stage"] for e in events if e["event"] == "stage_started"] == STAGES
    assert [e["slices"] for e in events if e["event"] == "inference_expected"] == [len(ct.files)]
    assert all(e["job_id"] == done["job_id"] and e["duration_ms"] >= 0 for e in events if e["event"] == "stage_done")
    report = status(node)
    assert "sent" in report and all(f"{stage} " in report for stage in STAGES)
    sinks = {"node log": node.log_text(), "status": report,
             "paths": "\n".join(str(p) for p in node.data_dir.rglob("*"))}
    leaks = [(canary, sink) for canary in canaries(ct) for sink, text in sinks.items() if canary in text]
    assert leaks == []


def test_tps_down_then_up_is_delivered_once(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    ct = phantom(tmp_path / "ct")
    orthanc = start_orthanc(tmp_path / "orthanc")
    try:
        orthanc.stop()
        # Attempts at 0, +2, +6, +14 s, then every 8 s: 20 attempts leave the TPS minutes to come up.
        retry = {"initial_backoff_seconds": 2, "multiplier": 2, "max_backoff_seconds": 8, "max_attempts": 20}
        node = node_factory(destinations=[tps_destination(orthanc, **retry)], routes=[route("tps")])
        send(node, ct.files)
        # The first try and the retries at +2 and +6 s fail while the TPS is down.
        failed = node.wait_for("send_failed", timeout=180, destination="tps", attempt=3)
        assert failed["permanent"] is False
        orthanc.start()
        wait_rtstruct(orthanc, ct.study_uid, timeout=180)
        done = node.wait_for("job_done", timeout=60)
        assert done["state"] == "sent"
        assert len(rtstructs_of(orthanc, ct.study_uid)) == 1
        events = node.events()
        assert sum(e["event"] == "send_succeeded" for e in events) == 1
        assert sum(e["event"] == "send_failed" for e in events) >= 3
    finally:
        if orthanc.process is not None and orthanc.process.poll() is None:
            orthanc.stop()


def test_tps_rejecting_us_dead_letters_without_retrying(node_factory: Callable[..., NodeProcess],
                                                         tmp_path: Path) -> None:
    ct = phantom(tmp_path / "ct")
    with orthanc_running(tmp_path / "orthanc", accept=False) as orthanc:
        node = node_factory(destinations=[tps_destination(orthanc)], routes=[route("tps")])
        send(node, ct.files)
        done = node.wait_for("job_done", timeout=120)
        assert done["state"] == "dead_letter"
        assert "tps: association rejected-permanent" in done["reason"]
        assert sum(e["event"] == "send_failed" for e in node.events()) == 1
        assert any(e["event"] == "alert" and e["stage"] == "send" for e in node.events())
        assert orthanc.datasets() == []
        assert "dead_letter" in status(node)


@pytest.mark.parametrize("point", ["after:pseudonymise", "before:infer", "after:infer", "after:structure",
                                   "after:reidentify", "before:send", "delivered", "after:send"])
def test_kill9_in_a_stage_resumes_and_sends_once(point: str, node_factory: Callable[..., NodeProcess],
                                                 tps: Orthanc, tmp_path: Path) -> None:
    ct = phantom(tmp_path / "ct")
    config = {"destinations": [tps_destination(tps)], "routes": [route("tps")]}
    node = node_factory(env={"CONTOUR_GW_FAILPOINT": point}, **config)
    send(node, ct.files)
    node.wait_for("failpoint_kill", timeout=120, point=point)
    assert node.process.wait(timeout=30) == -9
    node.kill9()  # the receiver processes too
    again = node_factory(config_path=node.config_path)
    done = again.wait_for("job_done", timeout=120)
    assert done["state"] == "sent"
    sent_once_then_shredded(again)
    assert len(rtstructs_of(tps, ct.study_uid)) == 1
    assert again.stop() == 0  # stopped (its associations ended, its stages committed): it can send nothing more
    assert len(rtstructs_of(tps, ct.study_uid)) == 1


def test_kill9_while_receiving_then_resent(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                           tmp_path: Path) -> None:
    ct = phantom(tmp_path / "ct")
    # A quiet period no restart outlasts, however slow (else the 12 would complete at start-up, the resent rest
    # make a second job); the job is completed by hand once everything was resent.
    config = {"destinations": [tps_destination(tps)], "routes": [route("tps")],
              "peers": [{"name": "pacs", "ae_title": "*", "host": "127.0.0.1", "quiet_seconds": 3600}]}
    node = node_factory(**config)
    send(node, ct.files[:12])
    job_id = node.wait_for("job_created", timeout=60)["job_id"]
    node.kill9()
    again = node_factory(config_path=node.config_path)
    send(again, ct.files)
    complete_now(again, job_id)
    done = again.wait_for("job_done", timeout=120)
    assert (done["job_id"], done["state"]) == (job_id, "sent")
    sent_once_then_shredded(again)
    rtstruct = wait_rtstruct(tps, ct.study_uid)
    assert len(rtstructs_of(tps, ct.study_uid)) == 1
    refs = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].ContourImageSequence
    assert len(refs) == len(ct.sop_uids)


def test_two_peers_at_once(node_factory: Callable[..., NodeProcess], tps: Orthanc, tmp_path: Path) -> None:
    studies = {"PACS_A": phantom(tmp_path / "a", patient=("ALPHA^CANARY", "ALPHA1")),
               "PACS_B": phantom(tmp_path / "b", patient=("BRAVO^CANARY", "BRAVO2"))}
    peers = [{"name": name.lower(), "ae_title": name, "host": "127.0.0.1", "quiet_seconds": 1} for name in studies]
    node = node_factory(peers=peers, destinations=[tps_destination(tps)], routes=[route("tps")])
    senders = [threading.Thread(target=send, args=(node, ct.files, ae)) for ae, ct in studies.items()]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    for ae, ct in studies.items():
        rtstruct = wait_rtstruct(tps, ct.study_uid)
        assert str(rtstruct.PatientID) == ("ALPHA1" if ae == "PACS_A" else "BRAVO2")
    deadline = time.monotonic() + 120
    while sum(e["event"] == "job_done" for e in node.events()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    events = node.events()
    created = {e["job_id"]: e["peer"] for e in events if e["event"] == "job_created"}
    assert sorted(created.values()) == ["pacs_a", "pacs_b"]
    for job_id in created:
        assert [e["stage"] for e in events if e["event"] == "stage_done" and e["job_id"] == job_id] == STAGES
        assert [e["state"] for e in events if e["event"] == "job_done" and e["job_id"] == job_id] == ["sent"]
    assert "ALPHA" not in node.log_text() and "BRAVO" not in node.log_text()


def _tilted(ct: CTSeries) -> None:
    for path in ct.files:  # 15 degrees of gantry tilt: each slice shifted along y by its z
        ds = pydicom.dcmread(path)
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]) + 0.268 * z, z]
        ds.save_as(path)


def _air(ct: CTSeries) -> None:
    for path in ct.files:
        ds = pydicom.dcmread(path)
        ds.PixelData = bytes(len(ds.PixelData))  # 0 stored = -1024 HU with the intercept below
        ds.RescaleIntercept = -1024.0
        ds.save_as(path)


def test_what_is_not_sent_says_why(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """A series no route takes, one with gantry tilt, and one where the model finds nothing: no RTSTRUCT."""
    head = phantom(tmp_path / "head", series_description="Head 2mm")
    tilted = phantom(tmp_path / "tilt")
    _tilted(tilted)
    air = phantom(tmp_path / "air")
    _air(air)
    thorax_only = route("folder") | {"match": {"Modality": "CT", "SeriesDescription": "/(?i).*thorax.*/"}}
    node = node_factory(destinations=[{"name": "folder", "type": "folder"}], routes=[thorax_only])
    expected = {}
    for ct, outcome in ((head, ("no_route", "series 1: no_route")),
                        (tilted, ("failed", "series 1: gantry_tilt")),
                        (air, ("failed", "series 1: inference_empty"))):
        send(node, ct.files)
        created = node.wait_for("job_created", timeout=60)
        expected[created["job_id"]] = outcome
        node.wait_for("job_done", timeout=120, job_id=created["job_id"])
        node.log_offset = node.log_path.stat().st_size  # the next study's events only
    states = {job_id: (state, reason) for job_id, state, reason in jobs_of(node.data_dir)}
    assert states == expected
    assert not (node.data_dir / "export").exists()
    node.log_offset = 0
    events = node.events()
    alerts = sorted(e["reason"] for e in events if e["event"] == "alert")
    assert alerts == ["gantry_tilt", "inference_empty"]
    report = status(node)
    assert all(reason in report for _, reason in expected.values())


def test_embedded_default_config_contours_into_its_folder(tmp_path: Path) -> None:
    """config/gateway.toml as shipped (only ports, data_dir, key and models_dir moved): a CT in, an RTSTRUCT out."""
    text = (REPO / "config" / "gateway.toml").read_text()
    key = tmp_path / "keys" / "master.key"
    made = subprocess.run([sys.executable, "-m", "gateway", "keygen", "--out", str(key)], capture_output=True,
                          text=True, cwd=REPO, timeout=30, check=False)  # as `make run` does
    assert made.returncode == 0, made.stderr
    for old, new in (("port = 11112", "port = 0"), ('data_dir = "../var"', f'data_dir = "{tmp_path / "var"}"'),
                     ('master_key_file = "../.keys/master.key"', f'master_key_file = "{key}"'),
                     ('models_dir = "../models"', f'models_dir = "{REPO / "models"}"')):
        assert old in text
        text = text.replace(old, new)
    assert "[metrics]" not in text  # the default metrics port (9464) may be taken on a shared machine
    text += "\n[metrics]\nport = 0\n"
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    ct = phantom(tmp_path / "ct")
    node = start_node(config, tmp_path / "node.log")
    try:
        send(node, ct.files)
        job_id = node.wait_for("job_created", timeout=60)["job_id"]
        complete_now(node, job_id)  # rather than wait out the default 30 s quiet period
        done = node.wait_for("job_done", timeout=120)
        assert done["state"] == "sent"
        [exported] = (tmp_path / "var" / "export" / "folder").glob("*.dcm")
        rtstruct = pydicom.dcmread(exported)
        assert rtstruct.Modality == "RTSTRUCT" and rtstruct.PatientID == pydicom.dcmread(ct.files[0]).PatientID
        assert [roi.ROIName for roi in rtstruct.StructureSetROISequence] == ["External", "Lung_L", "Lung_R"]
    finally:
        node.stop()


def test_each_series_of_a_study_gets_its_own_rtstruct(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                                      tmp_path: Path) -> None:
    first = phantom(tmp_path / "first")
    second = phantom(tmp_path / "second", study_uid=first.study_uid, series_description="Thorax 2mm recon")
    node = node_factory(destinations=[tps_destination(tps)], routes=[route("tps")])
    send(node, [*first.files, *second.files])
    done = node.wait_for("job_done", timeout=180)
    assert (done["state"], done["series"], done["sent"]) == ("sent", 2, 2)
    rtstructs = rtstructs_of(tps, first.study_uid)
    assert len(rtstructs) == 2
    referenced = {}
    for rtstruct in rtstructs:
        series = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
            .RTReferencedSeriesSequence[0]
        referenced[series.SeriesInstanceUID] = {image.ReferencedSOPInstanceUID for image in series.ContourImageSequence}
    assert referenced == {first.series_uid: set(first.sop_uids), second.series_uid: set(second.sop_uids)}
