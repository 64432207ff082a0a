"""The receiver's element walk against pydicom, on real CT and a real RTSTRUCT, and on broken data sets."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, generate_uid

from gateway.receiving.elements import MalformedDataSetError, top_level_values
from gateway.receiving.storage_scp import UndecodableError, identify
from tests.realct import dicompyler_file, real_chest_ct
from tests.synthetic import ct_slice

WANTED = frozenset({0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00280010, 0x00280011, 0x00280008,
                    0x7FE00010, 0x30060020})


def _slice() -> Dataset:
    return ct_slice(str(generate_uid()), str(generate_uid()), str(generate_uid()), 0, 64, np.random.default_rng(0))


def _encoded(ds: Dataset, syntax: str) -> bytes:
    """*ds* as a data set in *syntax* (no File Meta Information); sequences of undefined length as pydicom writes."""
    buffer = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def _jpeg_ls(ds: Dataset) -> Dataset:
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    ds.PixelData = encapsulate([imagecodecs.jpegls_encode(pixels)])
    ds["PixelData"].VR = "OB"
    return ds


def _samples(tmp_path: Path) -> list[tuple[str, bytes, str]]:
    rtss = pydicom.dcmread(dicompyler_file("rtss.dcm"))  # nested sequences, hundreds of contours
    ct = pydicom.dcmread(dicompyler_file("ct.0.dcm"))
    chest = pydicom.dcmread(real_chest_ct(tmp_path / "chest", slices=2).files[0])
    samples = [("rtstruct", rtss, ExplicitVRLittleEndian), ("rtstruct", rtss, ImplicitVRLittleEndian),
               ("ct", ct, ImplicitVRLittleEndian), ("ct", ct, ExplicitVRLittleEndian),
               ("chest", chest, ExplicitVRLittleEndian),
               ("jpeg-ls", _jpeg_ls(_slice()), JPEGLSLossless)]
    return [(name, _encoded(ds, syntax), syntax) for name, ds, syntax in samples]


def test_values_and_counts_are_what_pydicom_reads(tmp_path: Path) -> None:
    for name, data, syntax in _samples(tmp_path):
        implicit = UID(syntax).is_implicit_VR
        reference = read_dataset(io.BytesIO(data), implicit, True)
        values, count = top_level_values(data, implicit, WANTED)
        assert count == len(reference), name
        expected = {int(elem.tag): elem.value for elem in reference.elements()
                    if int(elem.tag) in WANTED and elem.length != 0xFFFFFFFF}  # raw elements: bytes
        assert values.keys() >= expected.keys() and {tag: values[tag] for tag in expected} == expected, name
        assert identify(data, UID(syntax)) is not None, name


def _nested(depth: int) -> bytes:
    """Implicit VR: a top-level sequence of undefined length, nested *depth* times, then a Rows element."""
    inner = b""
    for _ in range(depth):
        inner = (struct.pack("<HHI", 0x0008, 0x1115, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
                 + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return inner + struct.pack("<HHI", 0x0028, 0x0010, 2) + b"\x00\x02"


class TestBroken:
    def test_nesting_within_the_bound_is_walked(self) -> None:
        values, count = top_level_values(_nested(30), True, WANTED)
        assert values == {0x00280010: b"\x00\x02"} and count == 2

    @pytest.mark.parametrize("data", [
        _nested(40),  # deeper than any IOD
        _nested(3)[:-18],  # a sequence without its delimiter
        struct.pack("<HHI", 0xFFFE, 0xE000, 0) + _nested(1),  # an item at the top level
        struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 4) + b"\x00\x02",  # a value past the end
        struct.pack("<HH2sH", 0x0028, 0x0010, b"OB", 0) + b"\xff\xff",  # a long header cut off
        struct.pack("<HH2sHI", 0x0028, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0x0028, 0x0011, 0),
    ], ids=["too-deep", "no-delimiter", "item-at-top", "past-the-end", "cut-header", "sequence-of-non-items"])
    def test_an_element_that_does_not_fit_is_refused(self, data: bytes) -> None:
        implicit = not data[4:6].isalpha()
        with pytest.raises(MalformedDataSetError):
            top_level_values(data, implicit, WANTED)

    def test_undefined_length_on_a_short_value_is_refused(self) -> None:
        data = struct.pack("<HH2sHI", 0x0028, 0x0010, b"UT", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        with pytest.raises(MalformedDataSetError, match="cannot have one"):
            top_level_values(data, False, WANTED)

    def test_trailing_bytes_shorter_than_a_header_are_ignored_as_pydicom_does(self) -> None:
        data = _encoded(_slice(), ExplicitVRLittleEndian)
        assert top_level_values(data + b"\x00" * 7, False, WANTED) == top_level_values(data, False, WANTED)

    def test_every_cut_inside_an_element_is_refused_and_every_cut_between_elements_counts(self) -> None:
        data = _encoded(_slice(), ExplicitVRLittleEndian)
        reference = read_dataset(io.BytesIO(data), False, True)
        ends = [0, *(elem.value_tell + elem.length for elem in reference.elements())]  # raw: offsets kept
        assert ends[-1] == len(data)
        for cut in range(1, len(data), 7 if len(data) > 4096 else 1):
            whole = max(end for end in ends if end <= cut)
            if cut == whole or cut - whole < 8:  # at a boundary, or padding shorter than a header
                assert top_level_values(data[:cut], False, WANTED)[1] == ends.index(whole)
            else:
                with pytest.raises(MalformedDataSetError):
                    top_level_values(data[:cut], False, WANTED)

    def test_every_cut_inside_a_nested_sequence_is_refused(self) -> None:
        data = _nested(3)
        sequence_end = len(data) - 10  # then the Rows element
        for cut in range(8, sequence_end):
            with pytest.raises(MalformedDataSetError):
                top_level_values(data[:cut], True, WANTED)

    def test_random_corruption_is_refused_cleanly_or_walked(self) -> None:
        data = bytearray(_encoded(pydicom.dcmread(dicompyler_file("rtss.dcm")), ExplicitVRLittleEndian))
        rng = random.Random(22)
        walked = refused = 0
        for _ in range(3000):  # anything but MalformedDataSetError escaping fails the test
            mutated = bytearray(data)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(4096)] = rng.randrange(256)  # among the headers of the top and of sequences
            try:
                top_level_values(mutated, False, WANTED)
                walked += 1
            except MalformedDataSetError:
                refused += 1
        assert walked > 100 and refused > 100  # corruption of values passes, of headers is caught


def test_identify_refuses_what_the_walk_refuses_without_quoting_it() -> None:
    data = struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 40) + b"CANARY^PATIENT"
    with pytest.raises(UndecodableError) as caught:
        identify(data, ExplicitVRLittleEndian)
    assert "CANARY" not in str(caught.value)
