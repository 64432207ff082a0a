"""Pseudonymisation against PS3.15 Table E.1-1: canary sweep, random UIDs, quarantine, round trip."""

from __future__ import annotations

import io
import json
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
from gateway.store.jobs import JobState
from gateway.store.outputs import StageContext
from gateway.store.sealing import Purpose
from tests.identity.canary import CANARY_ROOT, CT_ROUTE, CanaryStudy, Received
from tests.synthetic import concrete_tag, confidentiality_rows, ct_slice


@dataclass
class Pseudonymised:
    data_dir: Path
    ctx: StageContext
    job_id: str
    datasets: list[Dataset]
    logs: list[dict[str, object]]
    node_log: str


@pytest.fixture
def pseudonymised(received: Received) -> Pseudonymised:
    """The canary study received by a real node, then pseudonymised."""
    ctx, job_id = received.ctx, received.job_id
    with capture_logs() as logs:
        pseudonymise_job(ctx, job_id, [CT_ROUTE])
    datasets = [pydicom.dcmread(io.BytesIO(ctx.sealer.open(job_id, Purpose.PSEUDONYMISED,
                                                           ctx.spool.read_work(job_id, file_id))))
                for file_id in ctx.spool.work_file_ids(job_id)]
    return Pseudonymised(received.data_dir, ctx, job_id, datasets, logs, received.node_log)


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
