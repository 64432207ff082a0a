"""Pseudonymisation against PS3.15 Table E.1-1: canary sweep, random UIDs, quarantine, round trip."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from structlog.testing import capture_logs

from gateway.identity.pseudonymise import UIDMap, new_pseudonym, pseudonymise, quarantine_reason
from gateway.identity.reidentify import reidentify
from gateway.identity.stages import pseudonymise_job
from gateway.identity.vault import Vault
from gateway.routes import Route
from gateway.store.jobs import JobState, JobStore
from gateway.store.keys import KeyRing
from gateway.store.outputs import StageContext
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool
from tests.conftest import NodeProcess, dcmtk_env, key_config, require_tool
from tests.synthetic import add_confidentiality_canaries, concrete_tag, confidentiality_rows, ct_slice

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
class Pseudonymised:
    data_dir: Path
    ctx: StageContext
    job_id: str
    datasets: list[Dataset]
    logs: list[dict[str, object]]
    node_log: str


@pytest.fixture
def pseudonymised(node_factory: Callable[..., NodeProcess], canary_study: CanaryStudy) -> Iterator[Pseudonymised]:
    """The canary study received by a real node, then pseudonymised."""
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
    with capture_logs() as logs:
        pseudonymise_job(ctx, job_id, [CT_ROUTE])
    datasets = [pydicom.dcmread(io.BytesIO(ctx.sealer.open(job_id, Purpose.PSEUDONYMISED,
                                                           spool.read_work(job_id, file_id))))
                for file_id in spool.work_file_ids(job_id)]
    yield Pseudonymised(node.data_dir, ctx, job_id, datasets, logs, node.log_text())
    jobs.close()


def _ui_values(ds: Dataset) -> list[str]:
    values = []
    for element in ds.iterall():
        if element.VR == "UI" and element.value:
            values += [str(v) for v in (element.value if isinstance(element.value, list | pydicom.multival.MultiValue)
                                        else [element.value])]
    return values


class TestCanarySweep:
    def test_no_canary_in_pseudonymised_data_files_or_logs(self, pseudonymised: Pseudonymised,
                                                           canary_study: CanaryStudy) -> None:
        assert len(pseudonymised.datasets) == 4
        sinks = {"logs": json.dumps(pseudonymised.logs, default=str), "node log": pseudonymised.node_log}
        for index, ds in enumerate(pseudonymised.datasets):
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            sinks[f"pseudonymised dataset {index}"] = buffer.getvalue().decode("latin-1")
        for path in pseudonymised.data_dir.rglob("*"):
            if path.is_file():  # spool, work, vault, database, keys: raw bytes
                sinks[str(path.relative_to(pseudonymised.data_dir))] = path.read_bytes().decode("latin-1")
        assert any(name.startswith("vault/") for name in sinks)
        leaks = [(canary, sink) for canary in canary_study.texts for sink, text in sinks.items() if canary in text]
        assert leaks == []

    def test_every_table_attribute_is_absent_but_new_uids_and_the_pseudonym(
            self, pseudonymised: Pseudonymised) -> None:
        table = {concrete_tag(row): row for row in confidentiality_rows() if concrete_tag(row) is not None}
        for ds in pseudonymised.datasets:
            present = {int(elem.tag) for elem in ds.iterall() if int(elem.tag) in table}
            assert present <= {0x0020000D, 0x0020000E, 0x00080018, 0x00200052, 0x00100010, 0x00100020}
            assert not any(elem.tag.is_private for elem in ds.iterall())
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
                uid = str(ds[keyword].value)
                assert uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid
                assert not uid.startswith(CANARY_ROOT)
            assert str(ds.PatientName) == str(ds.PatientID)
            assert str(ds.PatientID).startswith("PSEUDO-")
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
            assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert len({str(ds.StudyInstanceUID) for ds in pseudonymised.datasets}) == 1
        assert len({str(ds.FrameOfReferenceUID) for ds in pseudonymised.datasets}) == 1
        assert len({str(ds.SOPInstanceUID) for ds in pseudonymised.datasets}) == 4

    def test_pixel_data_and_geometry_unchanged(self, pseudonymised: Pseudonymised, canary_study: CanaryStudy) -> None:
        sources = sorted(canary_study.originals.values(), key=lambda d: float(d.ImagePositionPatient[2]))
        results = sorted(pseudonymised.datasets, key=lambda d: float(d.ImagePositionPatient[2]))
        for source, result in zip(sources, results, strict=True):
            assert result.PixelData == source.PixelData
            np.testing.assert_array_equal(result.pixel_array, source.pixel_array)
            for keyword in ("ImageOrientationPatient", "PixelSpacing", "RescaleIntercept", "RescaleSlope", "Rows"):
                assert result[keyword].value == source[keyword].value

    def test_quarantined_instances_are_recorded_and_not_processed(
            self, pseudonymised: Pseudonymised, canary_study: CanaryStudy) -> None:
        reasons = sorted(pseudonymised.ctx.jobs.quarantined(pseudonymised.job_id).values())
        assert reasons == sorted(canary_study.quarantined.values())
        assert pseudonymised.ctx.jobs.get(pseudonymised.job_id).state is JobState.PSEUDONYMISED
        warned = [e["reason"] for e in pseudonymised.logs if e["event"] == "instance_quarantined"]
        assert sorted(warned) == reasons


class TestRoundTrip:
    # as built, and as the re-identify stage gets it: read from bytes, its elements raw until used
    @pytest.mark.parametrize("form", ["in_memory", "explicit_vr", "implicit_vr"])
    def test_derived_result_is_reidentified_completely(self, pseudonymised: Pseudonymised,
                                                       canary_study: CanaryStudy, form: str) -> None:
        record = Vault(pseudonymised.ctx.spool, pseudonymised.ctx.sealer).load(pseudonymised.job_id)
        derived = _derived_result(pseudonymised.datasets)
        if form != "in_memory":
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, derived, implicit_vr=form == "implicit_vr", little_endian=True)
            derived = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
        pseudo = set(record.uids)
        assert pseudo & set(_ui_values(derived))
        reidentify(derived, record)
        values = _ui_values(derived)
        assert not pseudo & set(values)
        source = next(iter(canary_study.originals.values()))
        refs = derived.ReferencedFrameOfReferenceSequence[0]
        assert refs.FrameOfReferenceUID == source.FrameOfReferenceUID
        study_ref = refs.RTReferencedStudySequence[0]
        assert study_ref.ReferencedSOPInstanceUID == source.StudyInstanceUID
        images = study_ref.RTReferencedSeriesSequence[0].ContourImageSequence
        assert {str(i.ReferencedSOPInstanceUID) for i in images} == set(canary_study.originals)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription"):
            assert _raw(derived, keyword) == _raw(source, keyword), keyword
        assert "PatientIdentityRemoved" not in derived
        assert "DeidentificationMethodCodeSequence" not in derived


def _derived_result(datasets: list[Dataset]) -> Dataset:
    """An RTSTRUCT-like result built only from pseudonymised data, references nested 4 deep."""
    first = datasets[0]
    result = Dataset()
    result.SOPInstanceUID, result.StudyInstanceUID = generate_uid(), first.StudyInstanceUID
    result.PatientName, result.PatientID, result.PatientIdentityRemoved = first.PatientName, first.PatientID, "YES"
    result.DeidentificationMethodCodeSequence = first.DeidentificationMethodCodeSequence
    images = []
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        images.append(item)
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, images
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, [study]
    result.ReferencedFrameOfReferenceSequence = [frame]
    return result


def _raw(ds: Dataset, keyword: str) -> bytes:
    out = Dataset()
    out[keyword] = ds[keyword]
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, out)
    return buffer.getvalue()


class TestRandomUIDs:
    def test_pseudo_uids_are_not_recomputable_hashes(self) -> None:
        originals = [f"1.2.840.113619.2.55.3.{n}" for n in range(200)]
        uids = UIDMap()
        pseudo = {uids.pseudo(o) for o in originals}
        recomputed = {str(generate_uid(entropy_srcs=[o])) for o in originals}
        recomputed |= {str(generate_uid(prefix="2.25.", entropy_srcs=[o])) for o in originals}
        assert not pseudo & recomputed
        assert [uids.pseudo(o) for o in originals] == [uids.pseudo(o) for o in originals]  # 1:1, stable

    def test_no_collision_over_a_hundred_thousand(self) -> None:
        uids = UIDMap()
        pseudo = [uids.pseudo(f"1.2.3.{n}") for n in range(100_000)]
        assert len(set(pseudo)) == 100_000
        assert max(len(u) for u in pseudo) <= 64

    def test_pseudonyms_are_random(self) -> None:
        assert len({new_pseudonym() for _ in range(1000)}) == 1000


class TestQuarantineRules:
    @pytest.mark.parametrize(("changes", "reason"), [
        ({"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, None),
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL", "AVERAGE"]}, None),
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL", "MIP"]}, None),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "image_type_localizer"),
        ({"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, "image_type_screen_save"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary_capture"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "BurnedInAnnotation": "NO"}, "secondary_capture"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "BurnedInAnnotation": "YES"}, "secondary_capture"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.67"}, "dose_report"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, "sop_class_not_processed"),
        ({"ImageType": ["DERIVED", "SECONDARY", "DOSE_INFO"]}, "image_type_dose_info"),
        ({}, None),
    ])
    def test_reasons(self, changes: dict[str, object], reason: str | None) -> None:
        ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.5", 0, 8, np.random.default_rng(0))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        assert quarantine_reason(ds) == reason

    def test_derived_secondary_axial_passes_by_default(self) -> None:
        """A converted or TPS-exported planning CT (DERIVED\\SECONDARY\\AXIAL) passes, stated burned-in NO or not."""
        ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.5", 0, 8, np.random.default_rng(0))
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        assert "BurnedInAnnotation" not in ds
        assert quarantine_reason(ds) is None
        ds.BurnedInAnnotation = "NO"
        assert quarantine_reason(ds) is None


def test_pseudonymise_keeps_the_transfer_syntax(tmp_path: Path) -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.5", 0, 64, np.random.default_rng(0))
    ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    out = pseudonymise(ds, UIDMap(), "PSEUDO-X")
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(out.pixel_array, ds.pixel_array)


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian,
                                    pydicom.uid.RLELossless])
def test_encode_equals_pydicom(syntax: UID) -> None:
    from gateway.identity.pseudonymise import encode

    ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.5", 0, 16, np.random.default_rng(0))
    if syntax.is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    source = io.BytesIO()
    ds.save_as(source, enforce_file_format=True)
    out = pseudonymise(pydicom.dcmread(io.BytesIO(source.getvalue())), UIDMap(), "PSEUDO-X")
    expected = io.BytesIO()
    out.save_as(expected, enforce_file_format=True)
    ours = encode(out)
    assert pydicom.dcmread(io.BytesIO(ours)).file_meta.TransferSyntaxUID == syntax
    group_length = int.from_bytes(ours[140:144], "little")
    expected_length = int.from_bytes(expected.getvalue()[140:144], "little")
    assert ours[144 + group_length:] == expected.getvalue()[144 + expected_length:]
