#!/usr/bin/env python3
"""De-identification benchmark: our allow-list pseudonymisation against a plain pydicom blanking loop.

Method
------
* 300 CT instances of 512x512 (about 512 KB each) are generated in memory as Part 10 bytes.
* Each side does the same work per instance, in memory: parse the bytes, transform, encode
  to Part 10 bytes. Ours: :func:`gateway.identity.pseudonymise.pseudonymise` (a new dataset from the
  allow-list, random UIDs, pseudonym). Peer: the usual pydicom loop that blanks ~30
  identifying attributes in place and remaps the four study UIDs to new ones.
* The sides alternate over ``--repeat`` rounds; the median instances/s and the ratio
  ours / peer are printed (target >= 1.3).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gateway.identity.pseudonymise import UIDMap, encode, new_pseudonym, pseudonymise  # noqa: E402
from tests.synthetic import ct_slice  # noqa: E402

TARGET = 1.3
#: What a typical hand-written de-identification loop blanks.
BLANKED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight", "PatientSize",
    "PatientAddress", "OtherPatientIDs", "OtherPatientNames", "EthnicGroup", "PatientComments",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDate",
    "AcquisitionTime", "ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName",
    "InstitutionAddress", "StationName", "StudyDescription", "SeriesDescription", "DeviceSerialNumber",
)
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def make_instances(count: int, size: int) -> list[bytes]:
    """*count* encoded CT slices of one study, with the blanked attributes filled in."""
    rng = np.random.default_rng(1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for index in range(count):
        ds = ct_slice(study, series, frame, index, size, rng)
        for keyword in BLANKED:
            if keyword not in ds:
                setattr(ds, keyword, "20260101" if keyword.endswith("Date") else "1200" if keyword.endswith("Time")
                        else "M" if keyword == "PatientSex" else "045Y" if keyword == "PatientAge"
                        else "70" if keyword in ("PatientWeight", "PatientSize") else "BENCH")
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def ours(instances: list[bytes]) -> None:
    """Parse, pseudonymise (allow-list), encode."""
    uids, pseudonym = UIDMap(), new_pseudonym()
    for raw in instances:
        encode(pseudonymise(pydicom.dcmread(io.BytesIO(raw)), uids, pseudonym))


def peer(instances: list[bytes]) -> None:
    """Parse, blank ~30 attributes in place, remap the study UIDs, encode."""
    mapping: dict[str, str] = {}
    for raw in instances:
        ds = pydicom.dcmread(io.BytesIO(raw))
        for keyword in BLANKED:
            if keyword in ds:
                ds[keyword].value = ""
        for keyword in UIDS:
            original = str(ds[keyword].value)
            setattr(ds, keyword, mapping.setdefault(original, str(generate_uid())))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(io.BytesIO(), enforce_file_format=True)


def rate(run: Callable[[list[bytes]], None], instances: list[bytes]) -> float:
    start = time.perf_counter()
    run(instances)
    return len(instances) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    instances = make_instances(args.instances, args.size)
    results: dict[str, list[float]] = {"ours": [], "peer": []}
    for round_ in range(args.repeat):
        order = (("ours", ours), ("peer", peer)) if round_ % 2 == 0 else (("peer", peer), ("ours", ours))
        for name, run in order:
            results[name].append(rate(run, instances))
    ours_rate, peer_rate = statistics.median(results["ours"]), statistics.median(results["peer"])
    ratio = ours_rate / peer_rate
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"{args.instances} CT instances of {args.size}x{args.size}, median of {args.repeat} rounds")
    print(f"de-identification: gateway {ours_rate:.1f} inst/s, pydicom blanking loop {peer_rate:.1f} inst/s, "
          f"ratio {ratio:.2f} (target >= {TARGET}, {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
