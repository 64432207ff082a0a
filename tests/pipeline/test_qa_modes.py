"""Contour QA through a real node (dcmtk storescu as the PACS, Orthanc as the TPS): what each route mode sends.

The model is the shipped default with one expectation made impossible (Lung_L's volume range below any lung),
so its Lung_L fails the volume check on every series while the other structures pass: ``hold`` keeps the
study from the TPS until ``python -m gateway release``, ``drop`` sends it without Lung_L, and every mode keeps
the record in ``status``, ``python -m gateway qa`` and the audit trail, without patient data.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, CTSeries, NodeProcess, canaries
from tests.orthanc import Orthanc, orthanc_running
from tests.pipeline.test_e2e import (
    audit_records,
    jobs_of,
    phantom,
    route,
    rtstructs_of,
    send,
    status,
    tps_destination,
    wait_rtstruct,
)
from tests.realct import real_chest_ct_positioned

KEEP = "[retention]\nkeep_after_delivery_seconds = 3600"  # status and qa still show a delivered job


@pytest.fixture(scope="module")
def tps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with orthanc_running(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model package whose Lung_L may only be 1-2 ml: the volume check fails it."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "default", folder / "default")
    manifest = folder / "default" / "manifest.toml"
    text = manifest.read_text()
    head, tail = text.split('name = "Lung_L"', 1)
    tail = tail.replace("volume_ml = [50, 4500]", "volume_ml = [1, 2]", 1)
    manifest.write_text(head + 'name = "Lung_L"' + tail)
    return folder


def _gateway(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", args[0], "--config", str(node.config_path), *args[1:]],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def _observations(rtstruct: object) -> dict[str, str | None]:
    names = {roi.ROINumber: str(roi.ROIName) for roi in rtstruct.StructureSetROISequence}  # type: ignore[attr-defined]
    return {names[item.ReferencedROINumber]: item.get("ROIObservationLabel")
            for item in rtstruct.RTROIObservationsSequence}  # type: ignore[attr-defined]


def _phantom_sent(node_factory: Callable[..., NodeProcess], tps: Orthanc, models: Path, tmp_path: Path,
                  **qa: str) -> tuple[NodeProcess, CTSeries]:
    """The test phantom sent to a node whose route runs the *models* package (and has the *qa* mode given)."""
    ct = phantom(tmp_path / "ct")
    node = node_factory(destinations=[tps_destination(tps)], routes=[route("tps", **qa)], models_dir=models,
                        extra=KEEP)
    send(node, ct.files)
    return node, ct


@pytest.mark.timeout(240)
def test_hold_keeps_the_study_from_the_tps_until_released(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                                          models: Path, tmp_path: Path) -> None:
    node, ct = _phantom_sent(node_factory, tps, models, tmp_path, qa="hold")
    alert = node.wait_for("alert", timeout=120, reason="qa_failed")
    assert alert["stage"] == "structure" and alert["outcome"] == "held" and alert["structures"] == ["Lung_L"]
    [(job_id, state, reason)] = jobs_of(node.data_dir)
    assert (state, reason) == ("held", "series 1: qa_failed")
    time.sleep(3)  # the runner keeps polling: a held series must stay unsent
    assert rtstructs_of(tps, ct.study_uid) == []

    shown = status(node)
    assert "series 1: held" in shown and "qa: " in shown and "Lung_L volume_too_large" in shown, shown
    record = _gateway(node, "qa", job_id)
    assert record.returncode == 0, record.stderr
    lines = record.stdout.splitlines()
    assert lines[0].startswith(f"job {job_id} series 1: held (qa_failed); ") and "1 fail" in lines[0], lines
    flagged = {tuple(line.split()[:3]) for line in lines if line.endswith("<--")}
    # The phantom's lungs reach the end of its scan range: a warning each, which hold lets through.
    assert flagged == {("Lung_L", "volume", "fail"), ("Lung_L", "truncation", "warn"),
                       ("Lung_R", "truncation", "warn")}, lines
    assert any(line.split()[:3] == ["Lung_R", "laterality", "pass"] for line in lines), lines
    [checked] = [r for r in audit_records(node.data_dir) if r["event"] == "qa_checked"]
    assert (checked["job_id"], checked["mode"], checked["held"], checked["failures"]) == (job_id, "hold", True, 1)
    assert ("Lung_L", "volume_too_large") in [(f["structure"], f["reason"]) for f in checked["flagged"]]

    released = _gateway(node, "release", job_id)
    assert released.returncode == 0, released.stderr
    assert "series 1 released" in released.stdout
    rtstruct = wait_rtstruct(tps, ct.study_uid, timeout=120)
    assert node.wait_for("job_done", timeout=60)["state"] == "sent"
    assert _observations(rtstruct) == {"BODY": None, "Lung_R": "QA: truncation?", "Lung_L": "QA: volume?"}
    assert len(rtstructs_of(tps, ct.study_uid)) == 1
    [release] = [r for r in audit_records(node.data_dir) if r["event"] == "qa_released"]
    assert release["job_id"] == job_id and release["series"] == [1] and release["by"]
    again = _gateway(node, "release", job_id)
    assert again.returncode == 1 and "no series held" in again.stderr
    _no_canaries(node, ct, record.stdout + shown)


@pytest.mark.timeout(300)
def test_hold_keeps_every_series_of_the_study_when_one_fails(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                                             models: Path, tmp_path: Path) -> None:
    """Two series of one study on two routes: the one whose model QA fails (``qa = "hold"``) holds the other, which
    passes on its own route, so the TPS gets nothing of the study until it is released, then both."""
    both = tmp_path / "models"
    shutil.copytree(REPO / "models" / "default", both / "default")
    shutil.copytree(models / "default", both / "strict")
    manifest = both / "strict" / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('name = "default"', 'name = "strict"', 1))
    strict = phantom(tmp_path / "strict", series_description="Strict")
    normal = phantom(tmp_path / "normal", study_uid=strict.study_uid)
    routes = [route("tps", name="strict", match={"SeriesDescription": "Strict"}, model="strict", qa="hold"),
              route("tps")]
    node = node_factory(destinations=[tps_destination(tps)], routes=routes, models_dir=both, extra=KEEP)
    send(node, strict.files + normal.files)
    alert = node.wait_for("alert", timeout=120, reason="qa_failed")
    assert alert["structures"] == ["Lung_L"]
    held = node.wait_for("study_held", timeout=60)
    [(job_id, state, reason)] = jobs_of(node.data_dir)
    assert state == "held" and sorted(reason.split("; ")) == sorted(
        [f"series {held['series'][0]}: study_held", f"series {3 - held['series'][0]}: qa_failed"]), reason
    time.sleep(3)  # the runner keeps polling: neither series may leave
    assert rtstructs_of(tps, strict.study_uid) == []
    assert "series 1: held" in status(node) and "series 2: held" in status(node)

    released = _gateway(node, "release", job_id)
    assert released.returncode == 0 and "series 1, 2 released" in released.stdout, released
    assert node.wait_for("job_done", timeout=120)["state"] == "sent"
    sent = rtstructs_of(tps, strict.study_uid)
    assert sorted(_observations(rtstruct).get("Lung_L") or "" for rtstruct in sent) == ["QA: truncation?",
                                                                                     "QA: volume?"]
    [release] = [r for r in audit_records(node.data_dir) if r["event"] == "qa_released"]
    assert release["series"] == [1, 2]
    _no_canaries(node, strict, released.stdout)


@pytest.mark.timeout(240)
def test_drop_sends_the_structures_that_passed(node_factory: Callable[..., NodeProcess], tps: Orthanc,
                                               models: Path, tmp_path: Path) -> None:
    node, ct = _phantom_sent(node_factory, tps, models, tmp_path, qa="drop")
    rtstruct = wait_rtstruct(tps, ct.study_uid, timeout=120)
    assert node.wait_for("job_done", timeout=60)["state"] == "sent"
    assert _observations(rtstruct) == {"BODY": None, "Lung_R": "QA: truncation?"}
    assert str(rtstruct.StructureSetDescription).endswith(". QA left out 1: Lung_L")
    done = node.wait_for("stage_done", stage="structure")
    assert (done["qa_failures"], done["qa_dropped"]) == (1, 1)
    [checked] = [r for r in audit_records(node.data_dir) if r["event"] == "qa_checked"]
    assert (checked["mode"], checked["held"], checked["dropped"]) == ("drop", False, ["Lung_L"])


def test_annotate_is_the_default_and_release_refuses_unknown_jobs(node_factory: Callable[..., NodeProcess],
                                                                  tps: Orthanc, models: Path, tmp_path: Path) -> None:
    node, ct = _phantom_sent(node_factory, tps, models, tmp_path)
    rtstruct = wait_rtstruct(tps, ct.study_uid, timeout=120)
    assert _observations(rtstruct) == {"BODY": None, "Lung_R": "QA: truncation?", "Lung_L": "QA: volume?"}
    unknown = _gateway(node, "release", "0" * 16)
    assert unknown.returncode == 1 and f"no job with id {'0' * 16!r}" in unknown.stderr, unknown.stderr


def _no_canaries(node: NodeProcess, ct: CTSeries, printed: str) -> None:
    sinks = printed + node.log_text() + (node.data_dir / "audit" / "audit.jsonl").read_text()
    for canary in canaries(ct):
        assert canary not in sinks, canary


@pytest.mark.timeout(300)
@pytest.mark.parametrize("position", ["FFP", "HFP"])
def test_a_real_ct_in_another_patient_position_raises_no_false_alarm(
        node_factory: Callable[..., NodeProcess], tps: Orthanc, tmp_path: Path, position: str) -> None:
    """lung1 rewritten as scanned prone (and feet first): headers and pixels, same anatomy. Through a node with
    ``qa = "hold"``, nothing is held, and the only flags are the scan range reaching both lungs, as head first
    supine; the lungs lie on their own sides of the body's midline in the record."""
    ct = real_chest_ct_positioned(tmp_path / "ct", position, downsample=2)
    node = node_factory(destinations=[tps_destination(tps)], routes=[route("tps", qa="hold")], extra=KEEP)
    send(node, ct.files)
    rtstruct = wait_rtstruct(tps, ct.study_uid, timeout=150)
    done = node.wait_for("job_done", timeout=60)
    assert done["state"] == "sent"
    assert _observations(rtstruct) == {"BODY": None, "Lung_R": "QA: truncation?", "Lung_L": "QA: truncation?"}
    record = _gateway(node, "qa", done["job_id"]).stdout.splitlines()
    rows = {tuple(line.split()[:2]): line.split() for line in record[2:]}
    assert float(rows["Lung_L", "laterality"][3]) > 50 and float(rows["Lung_R", "laterality"][3]) < -50, record
    assert {row[2] for key, row in rows.items() if key[1] != "truncation"} == {"pass"}, record
