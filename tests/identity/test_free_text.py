"""No free text survives pseudonymisation: coded attributes keep Defined Terms only, and JPEG, JPEG-LS and
JPEG 2000 frames lose their comment and application segments while decoding to the same pixels."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import openjpeg
import pydicom
import pytest
from libjpeg import decode as libjpeg_decode
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from gateway.identity.encapsulated import MARKER_SYNTAXES, strip_frame, strip_pixel_data
from gateway.identity.prepare import route_for
from gateway.identity.pseudonymise import UIDMap, encode, pseudonymise, quarantine_reason
from gateway.identity.stages import pseudonymise_job
from gateway.routes import Route, RouteImages
from gateway.sop import TRANSFER_SYNTAXES
from gateway.store.jobs import JobStore
from gateway.store.outputs import StageContext
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool
from tests.conftest import key_ring
from tests.realct import real_ct_slice
from tests.receiving.test_transfer_syntaxes import ENCODERS, _dcmtk_encode
from tests.synthetic import ct_slice

CANARY = b"JOHN^DOE CANARY-4711"
PIXEL_DATA = 0x7FE00010


def _received(ds: Dataset, swap: dict[bytes, bytes] | None = None) -> Dataset:
    """*ds* as the node reads it from the spool: encoded, *swap* done on the bytes (values pydicom would refuse
    to write), read back with every element still raw."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    for old, new in (swap or {}).items():
        assert len(old) == len(new) and old in raw
        raw = raw.replace(old, new)
    return pydicom.dcmread(io.BytesIO(raw))


def _pseudonymised(ds: Dataset) -> tuple[bytes, Dataset]:
    """The node's pseudonymisation of *ds*: encoded bytes, and those bytes read back."""
    encoded = encode(pseudonymise(ds, UIDMap(), "PSEUDO-X"))
    return encoded, pydicom.dcmread(io.BytesIO(encoded))


def _slice(seed: int = 0, size: int = 32) -> Dataset:
    ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.5", 0, size, np.random.default_rng(seed))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    return ds


class TestCodedAttributes:
    def test_canary_free_text_does_not_survive(self) -> None:
        ds = _slice()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "XXXXXXXX"]
        ds.RescaleType, ds.PatientPosition, ds.SliceLocation = "HU JOHN DOE", "YYYYYYYY", "86420975"
        received = _received(ds, {b"XXXXXXXX": b"JOHN^DOE", b"YYYYYYYY": b"JOHN DOE", b"86420975": b"JOHN DOE"})
        assert b"JOHN^DOE" in received.get_item(0x00080008).value
        encoded, out = _pseudonymised(received)
        assert b"JOHN" not in encoded and b"DOE" not in encoded
        assert out.ImageType == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert out.RescaleType == "US"  # Unspecified: absent would claim HU
        assert "PatientPosition" not in out and "SliceLocation" not in out
        assert out.SliceThickness == received.SliceThickness  # numbers pass

    @pytest.mark.parametrize("decoded", [False, True], ids=["raw", "decoded"])
    @pytest.mark.parametrize(("image_type", "expected"), [
        (["ORIGINAL", "PRIMARY", "AXIAL"], ["ORIGINAL", "PRIMARY", "AXIAL"]),
        (["ORIGINAL", "JOHN DOE", "AXIAL"], ["ORIGINAL", "", "AXIAL"]),  # positions kept
        (["DERIVED", "SECONDARY", "AXIAL", "VMI", "CT_SOM5 SPI"], ["DERIVED", "SECONDARY", "AXIAL", "VMI"]),
        (["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 MIP"], ["ORIGINAL", "PRIMARY", "AXIAL"]),
        (["DERIVED", "SECONDARY", "", "MAT_REMOVED"], ["DERIVED", "SECONDARY", "", "MAT_REMOVED"]),
        (["ORIGINAL", "PRIMARY", "HELIX"], ["ORIGINAL", "PRIMARY"]),
        (["JOHN", "DOE"], None),
    ])
    def test_image_type_keeps_defined_terms_in_place(self, image_type: list[str], expected: list[str] | None,
                                                     decoded: bool) -> None:
        ds = _slice()
        ds.ImageType = image_type
        received = _received(ds)
        if decoded:  # what quarantine_reason() leaves behind in the pipeline
            quarantine_reason(received)
        _, out = _pseudonymised(received)
        assert (list(out.ImageType) if "ImageType" in out else None) == expected

    @pytest.mark.parametrize(("keyword", "value", "expected"), [
        ("RescaleType", "HU", "HU"),
        ("RescaleType", "MGML", "MGML"),
        ("RescaleType", "HOUNSFIELD UNITS", "US"),
        ("PatientPosition", "FFS", "FFS"),
        ("PatientPosition", "SUPINE", None),
        ("Modality", "CT", "CT"),
        ("PhotometricInterpretation", "MONOCHROME2", "MONOCHROME2"),
    ])
    def test_single_valued_codes(self, keyword: str, value: str, expected: str | None) -> None:
        ds = _slice()
        setattr(ds, keyword, value)
        _, out = _pseudonymised(_received(ds))
        assert out.get(keyword) == expected

    def test_known_values_are_copied_as_received(self) -> None:
        received = _received(_slice())
        out = pseudonymise(received, UIDMap(), "PSEUDO-X")
        for tag in (0x00080008, 0x00080060, 0x00280004, 0x00200032, PIXEL_DATA):
            assert out.get_item(tag) is received.get_item(tag)  # nothing decoded, nothing re-encoded

    def test_routing_still_sees_the_received_image_type(self) -> None:
        ds = _slice()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 MIP"]
        received = _received(ds)
        route = Route(name="ct", match={"Modality": "CT"}, model="default", destinations=["tps"],
                      images=RouteImages(skip_image_types=["MIP"]))
        _, out = _pseudonymised(received)
        assert "CT_SOM5 MIP" not in out.ImageType
        assert route_for(received, [route]) == (None, "image_type_mip")


# --- encapsulated frames -----------------------------------------------------------------------------------------


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _jpeg_header_end(frame: bytes) -> int:
    """Where the first SOS starts (a plain walk over the header's marker segments)."""
    pos = 2
    while frame[pos + 1] != 0xDA:
        pos += 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
    return pos


def _inject_jpeg(frame: bytes) -> bytes:
    """APP1 (EXIF-like) and COM after SOI, a COM and an APP12 before the last scan, text after EOI."""
    text = [_segment(0xE1, b"Exif\0\0" + CANARY), _segment(0xFE, CANARY)]
    last_scan = frame.rfind(b"\xff\xda")  # entropy-coded data cannot hold FFDA; a later scan follows tables
    injected = frame[:2] + b"".join(text) + frame[2:last_scan] + _segment(0xFE, CANARY) \
        + _segment(0xEC, b"Ducky" + CANARY) + frame[last_scan:]
    return injected + CANARY


def _codestream_tile_part(stream: bytes) -> int:
    pos = 2
    while stream[pos:pos + 2] != b"\xff\x90":
        pos += 2 + int.from_bytes(stream[pos + 2:pos + 4], "big")
    return pos


def _inject_codestream(stream: bytes) -> bytes:
    """COM after SIZ (main header) and after SOT (tile-part header, Psot grown to match), text after EOC."""
    com = _segment(0x64, b"\x00\x01" + CANARY)
    siz_end = 4 + int.from_bytes(stream[4:6], "big")
    sot = _codestream_tile_part(stream)
    psot = int.from_bytes(stream[sot + 6:sot + 10], "big")
    tile_part = stream[sot:sot + 6] + (psot + len(com)).to_bytes(4, "big") + stream[sot + 10:sot + 12] + com
    end = stream.rindex(b"\xff\xd9")
    return stream[:siz_end] + com + stream[siz_end:sot] + tile_part + stream[sot + 12:end + 2] + CANARY


def _box(box_type: bytes, content: bytes) -> bytes:
    return (8 + len(content)).to_bytes(4, "big") + box_type + content


def _inject_jp2(data: bytes) -> bytes:
    """'xml ' and 'uuid' boxes after 'ftyp', the codestream in 'jp2c' injected as a bare one."""
    jp2c = data.index(b"jp2c") - 4
    head, codestream = data[:jp2c], data[jp2c + 8:]
    text = _box(b"xml ", b"<name>" + CANARY + b"</name>") + _box(b"uuid", bytes(16) + CANARY)
    ftyp_end = 12 + int.from_bytes(data[12:16], "big")
    return head[:ftyp_end] + text + head[ftyp_end:] + _box(b"jp2c", _inject_codestream(codestream))


def _with_frames(ds: Dataset, frames: list[bytes], fragments_per_frame: int = 1) -> Dataset:
    ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame)
    return _received(ds)


def _j2k_encode(source: Path, target: Path) -> None:
    ds = pydicom.dcmread(source)
    ds.compress(JPEG2000, j2k_cr=[10], generate_instance_uid=False)
    ds.save_as(target, enforce_file_format=True)


#: name -> (encoder, transfer syntax, fragments per frame), on a real clinical CT slice (signed 16 bit).
REAL_CT_ENCODERS: dict[str, tuple[Callable[[Path, Path], None], UID, int]] = {
    "jpeg-lossless-sv1": (ENCODERS[JPEGLosslessSV1][0], JPEGLosslessSV1, 1),
    "jpeg-lossless-sv1-fragmented": (_dcmtk_encode("dcmcjpeg", "+e1"), JPEGLosslessSV1, 3),
    "jpeg-lossless-process14": (ENCODERS[JPEGLossless][0], JPEGLossless, 1),
    "jpeg-ls-lossless": (ENCODERS[JPEGLSLossless][0], JPEGLSLossless, 1),
    "jpeg-2000-lossless": (ENCODERS[JPEG2000Lossless][0], JPEG2000Lossless, 1),
    "jpeg-2000": (_j2k_encode, JPEG2000, 1),
}


class TestCompressedFrames:
    @pytest.mark.parametrize("name", list(REAL_CT_ENCODERS))
    def test_real_ct_frames_lose_text_and_decode_the_same(self, name: str, tmp_path: Path) -> None:
        encoder, syntax, fragments = REAL_CT_ENCODERS[name]
        source = real_ct_slice(tmp_path / "real").files[0]
        encoder(source, tmp_path / "compressed.dcm")
        compressed = pydicom.dcmread(tmp_path / "compressed.dcm")
        assert compressed.file_meta.TransferSyntaxUID == syntax
        expected = compressed.pixel_array
        frame = next(generate_frames(compressed.PixelData, number_of_frames=1))
        inject = _inject_codestream if syntax in (JPEG2000, JPEG2000Lossless) else _inject_jpeg
        received = _with_frames(compressed, [inject(frame)], fragments)
        np.testing.assert_array_equal(received.pixel_array, expected)  # the injected text is valid
        assert len(list(generate_fragments(received.PixelData))) == 1 + fragments  # after the offset table
        encoded, out = _pseudonymised(received)
        assert CANARY not in encoded
        assert out.file_meta.TransferSyntaxUID == syntax
        assert len(list(generate_fragments(out.PixelData))) == 2  # one fragment per frame
        np.testing.assert_array_equal(out.pixel_array, expected)
        if syntax == JPEGLSLossless:  # lossless to the original too
            np.testing.assert_array_equal(out.pixel_array, pydicom.dcmread(source).pixel_array)

    def test_jpeg_ls_near_lossless(self, tmp_path: Path) -> None:
        ds = _slice(size=64)
        ds.PixelRepresentation = 0  # dcmcjpls +en takes unsigned samples only; the values are 0..1999
        ds.save_as(tmp_path / "source.dcm", enforce_file_format=True)
        _dcmtk_encode("dcmcjpls", "+en")(tmp_path / "source.dcm", tmp_path / "near.dcm")
        compressed = pydicom.dcmread(tmp_path / "near.dcm")
        assert compressed.file_meta.TransferSyntaxUID == JPEGLSNearLossless
        frame = next(generate_frames(compressed.PixelData, number_of_frames=1))
        encoded, out = _pseudonymised(_with_frames(compressed, [_inject_jpeg(frame)]))
        assert CANARY not in encoded
        np.testing.assert_array_equal(out.pixel_array, compressed.pixel_array)

    @pytest.mark.parametrize("option", ["+ep", "+es"], ids=["progressive", "spectral-selection"])
    def test_tables_between_scans_are_kept(self, option: str, tmp_path: Path) -> None:
        """Multi-scan JPEG (retired syntaxes, decoded here with libjpeg): DHT between scans kept, COM/APPn not."""
        _slice(size=64).save_as(tmp_path / "source.dcm", enforce_file_format=True)
        _dcmtk_encode("dcmcjpeg", option)(tmp_path / "source.dcm", tmp_path / "scans.dcm")
        frame = next(generate_frames(pydicom.dcmread(tmp_path / "scans.dcm").PixelData, number_of_frames=1))
        assert frame.count(b"\xff\xda") > 1
        injected = _inject_jpeg(frame)
        np.testing.assert_array_equal(libjpeg_decode(injected), libjpeg_decode(frame))
        stripped = strip_frame(injected)
        assert CANARY not in stripped
        without_app0 = re.sub(rb"\xff\xe0\x00\x10JFIF\x00.{9}", b"", frame, flags=re.DOTALL)
        assert stripped == without_app0[:without_app0.rindex(b"\xff\xd9") + 2]  # no APP0 either, nor padding
        np.testing.assert_array_equal(libjpeg_decode(stripped), libjpeg_decode(frame))

    def test_every_frame_of_a_multi_frame_value(self) -> None:
        images = [np.random.default_rng(seed).integers(0, 4000, (24, 24)).astype(np.uint16) for seed in range(3)]
        frames = [imagecodecs.jpegls_encode(image) for image in images]
        for has_bot in (True, False):
            value = encapsulate([_inject_jpeg(frame) for frame in frames], has_bot=has_bot)
            stripped = list(generate_frames(strip_pixel_data(value, 3), number_of_frames=3))
            assert len(stripped) == 3 and not any(CANARY in frame for frame in stripped)
            for frame, image in zip(stripped, images, strict=True):
                np.testing.assert_array_equal(imagecodecs.jpegls_decode(frame), image)


class TestJPEGMarkers:
    def test_entropy_coded_data_is_copied_untouched(self) -> None:
        """0xFF00 stuffing, RSTn and marker-like text inside a scan stay; the COM before it goes."""
        sof = _segment(0xC3, b"\x10\x00\x02\x00\x02\x01\x01\x11\x00")
        sos = _segment(0xDA, b"\x01\x01\x00\x01\x00\x00")
        entropy = b"\x12\xff\x00\x34\xff\xd0\x56\xff\x00\xfe\xff\xd1\x78"
        frame = b"\xff\xd8" + _segment(0xFE, CANARY) + sof + sos + entropy + b"\xff\xd9"
        assert strip_frame(frame) == b"\xff\xd8" + sof + sos + entropy + b"\xff\xd9"

    def test_dnl_after_the_first_scan_is_kept(self) -> None:
        sof = _segment(0xC3, b"\x10\x00\x00\x00\x02\x01\x01\x11\x00")  # 0 lines: DNL gives them
        sos, dnl = _segment(0xDA, b"\x01\x01\x00\x01\x00\x00"), _segment(0xDC, b"\x00\x02")
        frame = b"\xff\xd8" + sof + sos + b"\x01\x02" + dnl + _segment(0xFE, CANARY) + b"\xff\xff\xd9\x00"
        assert strip_frame(frame) == b"\xff\xd8" + sof + sos + b"\x01\x02" + dnl + b"\xff\xd9"

    def test_colour_frames_keep_the_fixed_fields_of_jfif_and_adobe(self) -> None:
        image = np.random.default_rng(1).integers(0, 256, (16, 16, 3)).astype(np.uint8)
        frame = imagecodecs.jpeg8_encode(image, level=95)
        adobe = _segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01" + CANARY)
        injected = _inject_jpeg(frame[:2] + adobe + frame[2:])
        stripped = strip_frame(injected)
        assert CANARY not in stripped
        assert _segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01") in stripped
        assert stripped.startswith(b"\xff\xd8\xff\xee") and b"JFIF\x00" in stripped
        np.testing.assert_array_equal(imagecodecs.jpeg8_decode(stripped), imagecodecs.jpeg8_decode(injected))

    def test_a_frame_that_is_no_jpeg_is_refused(self) -> None:
        with pytest.raises(ValueError, match="frame 1 of 1: not a JPEG, JPEG-LS or JPEG 2000 stream"):
            strip_pixel_data(encapsulate([b"GIF89a" + CANARY]), 1)

    def test_a_truncated_segment_is_refused(self) -> None:
        with pytest.raises(ValueError, match="runs past the end"):
            strip_frame(b"\xff\xd8\xff\xfe\x01\x00" + CANARY)


class TestJPEG2000:
    def test_tile_part_comments_go_and_lengths_stay_right(self) -> None:
        image = np.random.default_rng(2).integers(0, 3000, (48, 40)).astype(np.uint16)
        stream = openjpeg.encode(image, add_tlm=True, add_plt=True)
        assert b"\xff\x55" in stream[:_codestream_tile_part(stream)] and b"\xff\x58" in stream  # TLM, PLT
        injected = _inject_codestream(stream)
        np.testing.assert_array_equal(openjpeg.decode(injected), image)
        stripped = strip_frame(injected)
        assert CANARY not in stripped and b"\xff\x64" not in stripped[:_codestream_tile_part(stripped)]
        assert b"\xff\x55" not in stripped[:_codestream_tile_part(stripped)]  # TLM went with the changed length
        sot = _codestream_tile_part(stripped)
        assert int.from_bytes(stripped[sot + 6:sot + 10], "big") == len(stripped) - 2 - sot
        np.testing.assert_array_equal(openjpeg.decode(stripped), image)

    def test_jp2_file_keeps_only_what_decoding_needs(self) -> None:
        image = np.random.default_rng(3).integers(0, 3000, (40, 48)).astype(np.uint16)
        jp2 = openjpeg.encode(image, codec_format=1, photometric_interpretation=2)
        injected = _inject_jp2(jp2)
        np.testing.assert_array_equal(openjpeg.decode(injected), image)
        stripped = strip_frame(injected + b"\x00")  # with the pad byte of an odd-length frame
        assert CANARY not in stripped and b"xml " not in stripped and b"uuid" not in stripped
        assert b"jp2h" in stripped and b"ftyp" in stripped
        np.testing.assert_array_equal(openjpeg.decode(stripped), image)


class TestTransferSyntaxes:
    def test_marker_syntaxes_cover_every_jpeg_family_syntax_the_node_accepts(self) -> None:
        compressed = {str(uid) for uid in TRANSFER_SYNTAXES if UID(uid).is_compressed}
        assert compressed - MARKER_SYNTAXES == {RLELossless}

    @pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
    def test_other_syntaxes_pass_pixel_data_through(self, syntax: UID) -> None:
        ds = _slice()
        if syntax.is_compressed:
            ds.compress(syntax, generate_instance_uid=False)
        received = _received(ds)
        out = pseudonymise(received, UIDMap(), "PSEUDO-X")
        assert out.get_item(PIXEL_DATA) is received.get_item(PIXEL_DATA)


def test_an_instance_whose_frames_cannot_be_parsed_is_quarantined(tmp_path: Path) -> None:
    """Not retried as an internal error: set aside with its reason, the rest of the study processed."""
    spool = Spool(tmp_path / "var")
    spool.prepare()
    jobs = JobStore(spool.database_path)
    ctx = StageContext(spool, jobs, Sealer(key_ring(tmp_path / "keys"), jobs))
    job_id = jobs.reserve("a" * 64, "pacs", 1.0, time.time()).job_id
    good = _slice(seed=1)
    bad = _slice(seed=2)
    bad.SOPInstanceUID = "1.2.3.6"
    bad.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    for index, ds in enumerate((good, _with_frames(bad, [b"GIF89a" + CANARY]))):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        file_id, size = spool.write_instance(job_id, ctx.sealer.seal(job_id, Purpose.RECEIVED, [buffer.getvalue()]))
        jobs.record_instance(job_id, f"{index:064x}", file_id, size, time.time())
        jobs.release(job_id)
    jobs.force_complete(job_id, time.time())
    route = Route(name="ct", match={"Modality": "CT"}, model="default", destinations=["folder"])
    done = pseudonymise_job(ctx, job_id, [route])
    assert done.quarantined == {"undecodable_pixel_data": 1}
    assert list(jobs.quarantined(job_id).values()) == ["undecodable_pixel_data"]
    assert len(spool.work_file_ids(job_id)) == 1
    jobs.close()
