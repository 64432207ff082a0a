"""The canary study of the identity tests: every PS3.15 Table E.1-1 attribute set, and instances to quarantine;
received by a real node (``storescu``) and handed over as a stage context on its data folder."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.routes import Route
from gateway.store.jobs import JobStore
from gateway.store.keys import KeyRing
from gateway.store.outputs import StageContext
from gateway.store.sealing import Sealer
from gateway.store.spool import Spool
from tests.conftest import NodeProcess, dcmtk_env, key_config, require_tool
from tests.synthetic import add_confidentiality_canaries, ct_slice

CANARY_ROOT = "1.2.826.0.1.3680043.8.498.97"


@dataclass
class CanaryStudy:
    files: list[Path]
    texts: list[str]  # every canary, searchable as text
    originals: dict[str, Dataset]  # SOP Instance UID -> source dataset (processable slices)
    quarantined: dict[str, str]  # SOP Instance UID -> expected reason


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def canary_study(tmp_path: Path) -> CanaryStudy:
    """4 processable slices with every Table E.1-1 attribute set, plus 4 instances to quarantine:
    burned-in annotation, a localizer, a secondary capture, a dose report (all of the same patient)."""
    folder = tmp_path / "canary"
    folder.mkdir()
    study, series, frame = f"{CANARY_ROOT}.1", f"{CANARY_ROOT}.2", f"{CANARY_ROOT}.3"
    rng = np.random.default_rng(5)
    files, originals, quarantined, texts = [], {}, {}, [study, series, frame]
    for index in range(6):
        ds = ct_slice(study, series, frame, index, 32, rng)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{CANARY_ROOT}.10{index}"
        texts += [*add_confidentiality_canaries(ds), str(ds.SOPInstanceUID)]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        if index == 4:
            ds.BurnedInAnnotation = "YES"
            quarantined[str(ds.SOPInstanceUID)] = "burned_in_annotation"
        elif index == 5:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            quarantined[str(ds.SOPInstanceUID)] = "image_type_localizer"
        else:
            originals[str(ds.SOPInstanceUID)] = ds
        files.append(_write(ds, folder / f"slice{index}.dcm"))
    capture = ct_slice(study, series, frame, 6, 32, rng)
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    capture.SOPInstanceUID = capture.file_meta.MediaStorageSOPInstanceUID = f"{CANARY_ROOT}.106"
    quarantined[str(capture.SOPInstanceUID)] = "secondary_capture"
    dose = _dose_report(study, f"{CANARY_ROOT}.107")
    patient = next(iter(originals.values()))
    for other in (capture, dose):  # the same patient, as the modality writes it on every instance
        for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate"):
            other[keyword] = patient[keyword]
    files.append(_write(capture, folder / "capture.dcm"))
    files.append(_write(dose, folder / "dose.dcm"))
    quarantined[f"{CANARY_ROOT}.107"] = "dose_report"
    texts.append("CANARY^DOSE^REPORT")
    return CanaryStudy(files, sorted(set(texts)), originals, quarantined)


def _dose_report(study: str, instance: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{CANARY_ROOT}.4"
    ds.Modality, ds.ValueType, ds.StudyDescription = "SR", "CONTAINER", "CANARY^DOSE^REPORT"
    return ds


CT_ROUTE = Route(name="ct", match={"Modality": "CT"}, model="default", destinations=["tps"])


@dataclass
class Received:
    """The canary study as a stopped node left it, its job complete and not yet pseudonymised."""

    data_dir: Path
    ctx: StageContext
    job_id: str
    node_log: str


@pytest.fixture
def received(node_factory: Callable[..., NodeProcess], canary_study: CanaryStudy) -> Iterator[Received]:
    """The canary study received by a real node, which is then stopped."""
    node = node_factory()
    result = subprocess.run([require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                             str(node.port), *map(str, canary_study.files)], capture_output=True, text=True,
                            env=dcmtk_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = node.wait_for("job_created")["job_id"]
    assert node.stop() == 0
    spool = Spool(node.data_dir)
    jobs = JobStore(spool.database_path)
    ctx = StageContext(spool, jobs, Sealer(KeyRing.open(key_config(node.data_dir)), jobs))
    jobs.force_complete(job_id, time.time())  # stopped within its quiet period
    yield Received(node.data_dir, ctx, job_id, node.log_text())
    jobs.close()
