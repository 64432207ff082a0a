"""Size caps: data set bytes and pixels at receipt, voxels and plausible geometry per series, the model grid."""

from __future__ import annotations

import io
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from gateway.config import parse_config
from gateway.errors import VolumeError
from gateway.inference.manifest import load_model_package
from gateway.inference.predictor import Predictor
from gateway.inference.volume import Volume, VolumeLimits, volume_from_datasets
from gateway.limits import Limits
from gateway.ops.metrics import STORE_REFUSALS
from gateway.receiving.dimse import DiscardedDataSet, GatewayDIMSE
from gateway.receiving.storage_scp import REFUSALS, UndecodableError, identify
from tests.conftest import (
    CANARY_ACCESSION,
    CANARY_BIRTH,
    CANARY_ID,
    CANARY_NAME,
    CANARY_STUDY_PREFIX,
    NodeProcess,
    dataset_bytes,
    dcmtk_env,
    group_memory_kib,
    require_tool,
    spooled_by_sop,
)
from tests.inference.test_volume import series
from tests.onnx_models import manifest, threshold_network
from tests.receiving.test_hardening import associate_rq, connect, echo
from tests.synthetic import ct_slice

MIB = 1024 * 1024
CANARIES = [CANARY_NAME, "CANARY", CANARY_ID, CANARY_BIRTH, CANARY_ACCESSION, CANARY_STUDY_PREFIX]


def _slice(index: int = 0, size: int = 64, study_uid: str | None = None) -> Dataset:
    study_uid = study_uid or generate_uid(prefix=CANARY_STUDY_PREFIX + ".")
    return ct_slice(study_uid, generate_uid(), generate_uid(), index, size, np.random.default_rng(index))


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _oversized(path: Path, pixel_bytes: int) -> Dataset:
    """A canary CT instance whose Pixel Data holds *pixel_bytes* zeros (a sparse file: nothing is written)."""
    ds = _slice()
    del ds.PixelData
    ds.Rows = ds.Columns = 16384
    _write(ds, path)
    with path.open("r+b") as file:
        file.seek(0, os.SEEK_END)
        file.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes))
        file.truncate(file.tell() + pixel_bytes)
    return ds


def _pixel_bomb(folder: Path, count: int) -> list[Path]:
    """A JPEG-LS series of *count* instances of 16384 x 16384 pixels each (about 2.5 KB per instance)."""
    folder.mkdir()
    frame = bytes(imagecodecs.jpegls_encode(np.zeros((16384, 16384), dtype=np.uint16)))
    study_uid = generate_uid(prefix=CANARY_STUDY_PREFIX + ".")
    files = []
    for index in range(count):
        ds = _slice(index, study_uid=study_uid)
        ds.Rows = ds.Columns = 16384
        ds.PixelRepresentation = 0
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        files.append(_write(ds, folder / f"bomb{index}.dcm"))
    return files


def _storescu(port: int, files: list[Path], *options: str) -> list[str]:
    """Send *files* over one association, going on after a failure; the status of each response, in order."""
    result = subprocess.run([require_tool("storescu"), "-v", "-nh", *options, "-aet", "PACS", "-aec", "CONTOUR_GW",
                             "127.0.0.1", str(port), *map(str, files)],
                            capture_output=True, text=True, env=dcmtk_env(), timeout=120)
    output = result.stdout + result.stderr
    assert "Association Accepted" in output, output
    return [line.split("Received Store Response", 1)[1].strip(" ()") for line in output.splitlines()
            if "Received Store Response" in line]


def _peak_rss_kib(pgid: int) -> dict[int, int]:
    """VmHWM (the most resident memory each process ever had) of every process in the node's group."""
    return group_memory_kib(pgid, "VmHWM")


def _peak_growth_kib(pgid: int, before: dict[int, int]) -> int:
    return max(peak - before.get(pid, 0) for pid, peak in _peak_rss_kib(pgid).items())


def _refusals(node: NodeProcess) -> list[dict[str, object]]:
    return [event for event in node.events() if event["event"] == "store_refused"]


def _c_store_rq(message_id: int, data_set: bytes) -> list[P_DATA]:
    """The P-DATA primitives of a C-STORE-RQ carrying *data_set*, at most 4 KiB each, as pynetdicom sends them."""
    request = C_STORE()
    request.MessageID, request.Priority = message_id, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    request.DataSet = io.BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(1, 4096))


def _one_pdu(primitives: list[P_DATA]) -> P_DATA:
    joined = P_DATA()
    items: Any = [list(item) for p in primitives for item in p.presentation_data_value_list]
    joined.presentation_data_value_list = items  # lists, as pynetdicom's decoder makes
    return joined


class TestDimseBound:
    """The data set bound of the receiver's DIMSE provider, fed the P-DATA of real C-STORE requests."""

    @staticmethod
    def _received(cap: int, *primitives: P_DATA) -> list[Any]:
        dimse = GatewayDIMSE(Association(AE(), "acceptor"), cap)
        for primitive in primitives:
            dimse.receive_primitive(primitive)
        requests = []
        while not dimse.msg_queue.empty():
            requests.append(dimse.msg_queue.get()[1])
        return requests

    def test_a_data_set_of_exactly_the_cap_is_kept_whole(self) -> None:
        data = bytes(range(256)) * 64
        (request,) = self._received(len(data), *_c_store_rq(1, data))
        assert request.DataSet is not None and request.DataSet.getvalue() == data
        assert not isinstance(request.DataSet, DiscardedDataSet)

    def test_one_byte_more_is_discarded_and_the_next_message_is_whole(self) -> None:
        data = bytes(range(256)) * 64
        first, second = self._received(len(data) - 1, *_c_store_rq(1, data), *_c_store_rq(2, data[:-1]))
        assert isinstance(first.DataSet, DiscardedDataSet) and first.DataSet.getvalue() == b""
        assert first.DataSet.received_bytes == len(data) and first.MessageID == 1
        assert second.DataSet is not None and second.DataSet.getvalue() == data[:-1] and second.MessageID == 2

    def test_messages_sharing_one_pdu_are_each_decoded(self) -> None:
        data = b"\x08\x00" * 3000
        first, second = self._received(len(data), _one_pdu([*_c_store_rq(1, data), *_c_store_rq(2, data)]))
        assert (first.MessageID, second.MessageID) == (1, 2)
        assert first.DataSet is not None and second.DataSet is not None
        assert first.DataSet.getvalue() == second.DataSet.getvalue() == data


class TestDataSetBytes:
    def test_an_oversized_data_set_is_refused_without_buffering_and_the_association_goes_on(
            self, node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
        node = node_factory()
        small = [_write(_slice(index), tmp_path / f"small{index}.dcm") for index in range(3)]
        assert _storescu(node.port, small[:1]) == ["Success"]  # receivers warmed up
        peaks = _peak_rss_kib(node.process.pid)
        big = _oversized(tmp_path / "big.dcm", 512 * MIB)  # four times the default 128 MiB
        statuses = _storescu(node.port, [small[1], tmp_path / "big.dcm", small[2]])
        assert statuses == ["Success", "Refused: OutOfResources", "Success"]
        # Buffered whole, 512 MiB would cost a receiver 1.7 GB at its peak; refused on the way, the cap and a copy.
        assert _peak_growth_kib(node.process.pid, peaks) < 400 * 1024
        (refusal,) = _refusals(node)
        assert refusal["status"] == "0xA700" and refusal["reason"] == "dataset_too_large"
        assert int(str(refusal["bytes"])) > 512 * MIB
        assert str(big.SOPInstanceUID) not in spooled_by_sop(node.data_dir)
        log = node.log_text()
        assert not [canary for canary in [*CANARIES, str(big.SOPInstanceUID)] if canary in log]
        samples = node.metrics()
        assert samples[("gateway_instances_refused_total", (("reason", "dataset_too_large"),))] == 1
        assert samples[("gateway_instances_total", (("outcome", "refused"),))] == 1
        assert samples[("gateway_instances_total", (("outcome", "stored"),))] == 3

    def test_a_command_set_past_64_kib_aborts_the_association(self, node_factory: Callable[..., NodeProcess]) -> None:
        node = node_factory()
        fragment = b"\x01" + bytes(40 * 1024)  # command information, not the last fragment
        pdu = struct.pack(">I", len(fragment) + 1) + b"\x01" + fragment  # one PDV on presentation context 1
        with connect(node) as sock:
            sock.sendall(associate_rq())
            assert sock.recv(6)[0] == 0x02  # A-ASSOCIATE-AC
            sock.recv(65536)
            for _ in range(2):
                sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdu)) + pdu)
            sock.settimeout(5)
            assert sock.recv(1) == b"\x07"  # A-ABORT
        assert node.wait_for("connection_aborted", reason="command_set_too_long")
        assert echo(node)


class TestPixels:
    def test_a_31_kb_jpeg_ls_series_declaring_16384_squared_pixels_is_refused_undecoded(
            self, node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
        node = node_factory()
        bombs = _pixel_bomb(tmp_path / "bomb", 12)
        assert sum(path.stat().st_size for path in bombs) < 40 * 1024
        normal = _write(_slice(), tmp_path / "normal.dcm")
        assert _storescu(node.port, [normal]) == ["Success"]
        peaks = _peak_rss_kib(node.process.pid)
        statuses = _storescu(node.port, [*bombs, normal], "-xt")  # proposes JPEG-LS Lossless only
        assert statuses[:-1] == ["Error: CannotUnderstand"] * 12 and statuses[-1] == "Success"
        assert _peak_growth_kib(node.process.pid, peaks) < 64 * 1024  # one decoded frame would be 512 MiB
        refusals = _refusals(node)
        assert [(r["status"], r["reason"], r["pixels"]) for r in refusals] == [("0xC230", "too_many_pixels",
                                                                                16384 * 16384)] * 12
        assert len(spooled_by_sop(node.data_dir)) == 1
        assert not [canary for canary in CANARIES if canary in node.log_text()]
        samples = node.metrics()
        assert samples[("gateway_instances_refused_total", (("reason", "too_many_pixels"),))] == 12
        assert samples[("gateway_instances_refused_total", (("reason", "dataset_too_large"),))] == 0


def test_the_limits_section_sets_the_receive_caps(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """The receiver process takes both caps from ``[limits]`` (gateway.receiving.receiver passes them on)."""
    node = node_factory(extra="[limits]\nmax_dataset_bytes = 1048576\nmax_pixels_per_instance = 4096")
    small, wide = _write(_slice(1), tmp_path / "small.dcm"), _write(_slice(2, size=128), tmp_path / "wide.dcm")
    _oversized(tmp_path / "big.dcm", 2 * MIB)
    statuses = _storescu(node.port, [small, wide, tmp_path / "big.dcm", small])
    assert statuses == ["Success", "Error: CannotUnderstand", "Refused: OutOfResources", "Success"]
    assert [r["reason"] for r in _refusals(node)] == ["too_many_pixels", "dataset_too_large"]


class TestIdentify:
    @staticmethod
    def _encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return dataset_bytes(buffer.getvalue())

    @pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    @pytest.mark.parametrize(("frames", "pixels"), [(None, 64 * 48), ("1", 64 * 48), ("30 ", 30 * 64 * 48)])
    def test_pixels_are_rows_columns_and_frames(self, syntax: str, frames: str | None, pixels: int) -> None:
        ds = _slice()
        ds.Columns = 48
        if frames is not None:
            ds.add_new(0x00280008, "IS", frames)
        identity = identify(self._encoded(ds, syntax), UID(syntax))
        assert identity is not None and identity.pixels == pixels

    def test_an_instance_without_an_image_declares_no_pixels(self) -> None:
        ds = _slice()
        del ds.Rows, ds.Columns, ds.PixelData
        identity = identify(self._encoded(ds), ExplicitVRLittleEndian)
        assert identity is not None and identity.pixels == 0

    @pytest.mark.parametrize("frames", ["0", "-3", "many", "1.5", "1\\2"])
    def test_a_malformed_number_of_frames_is_undecodable(self, frames: str) -> None:
        ds = _slice()
        ds.add_new(0x00280008, "IS", "1")
        raw = self._encoded(ds).replace(b"IS\x02\x001 ", b"IS" + struct.pack("<H", len(frames.ljust(4)))
                                        + frames.ljust(4).encode())
        with pytest.raises(UndecodableError, match="Number of Frames"):
            identify(raw, ExplicitVRLittleEndian)


def test_every_refusal_has_a_status_and_a_counter() -> None:
    assert set(REFUSALS) == set(STORE_REFUSALS)


def _headers_only(slices: list[Dataset], rows: int, columns: int) -> list[Dataset]:
    for ds in slices:
        ds.Rows, ds.Columns = rows, columns
        del ds.PixelData  # nothing to decode: a check after decoding would fail differently
    return slices


class TestSeriesLimits:
    def test_the_default_voxel_limit_refuses_2049_slices_of_512_squared_before_decoding(self) -> None:
        slices = _headers_only(series(count=2049), 512, 512)
        with pytest.raises(VolumeError) as caught:
            volume_from_datasets(slices)
        assert caught.value.reason == "series_too_large"
        assert "2049 x 512 x 512" in str(caught.value)

    def test_a_series_at_the_voxel_limit_is_a_volume(self) -> None:
        slices = series(count=12)
        assert volume_from_datasets(slices, VolumeLimits(max_voxels=12 * 16 * 16)).shape == (12, 16, 16)
        with pytest.raises(VolumeError, match=r"^series_too_large: "):
            volume_from_datasets(slices, VolumeLimits(max_voxels=12 * 16 * 16 - 1))

    @pytest.mark.parametrize("spacing", [[0.01, 0.7], [0.8, 6.0], [-0.8, 0.7], [0.0, 0.7]])
    def test_implausible_pixel_spacing(self, spacing: list[float]) -> None:
        slices = _headers_only(series(), 16, 16)
        for ds in slices:
            ds.PixelSpacing = spacing
        with pytest.raises(VolumeError) as caught:
            volume_from_datasets(slices)
        assert caught.value.reason == "implausible_pixel_spacing"

    @pytest.mark.parametrize("gap", [0.05, 25.0])
    def test_implausible_slice_spacing(self, gap: float) -> None:
        with pytest.raises(VolumeError) as caught:
            volume_from_datasets(_headers_only(series(gaps=[gap] * 11), 16, 16))
        assert caught.value.reason == "implausible_slice_spacing"

    def test_a_slice_without_pixel_spacing(self) -> None:
        slices = series()
        del slices[4].PixelSpacing
        with pytest.raises(VolumeError) as caught:
            volume_from_datasets(slices)
        assert caught.value.reason == "no_pixel_grid"

    def test_limits_come_from_the_configuration(self) -> None:
        config = parse_config({"limits": {"max_series_voxels": 10 * 64 * 64, "pixel_spacing_mm": [0.5, 1.0],
                                          "slice_spacing_mm": [1.0, 3.0]}})
        limits = VolumeLimits.from_config(config.limits)
        assert (limits.max_voxels, limits.pixel_spacing_mm, limits.slice_spacing_mm) == (
            10 * 64 * 64, (0.5, 1.0), (1.0, 3.0))
        assert limits.min_slices == VolumeLimits().min_slices
        defaults = VolumeLimits.from_config(Limits())
        assert defaults == VolumeLimits()


class TestModelGrid:
    @pytest.fixture
    def predictor(self, tmp_path: Path) -> Predictor:
        threshold_network(tmp_path / "m" / "model.onnx")
        return Predictor(load_model_package(manifest(tmp_path / "m", spacing=(1.5, 1.5, 1.5))))

    @staticmethod
    def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Volume:
        # SPL (the model's orientation) axial CT; the voxels are a zero-stride view, so any shape costs nothing.
        affine = np.eye(4)
        affine[:3, :3] = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float).T * np.array(spacing)
        hu = np.broadcast_to(np.int16(-1000), shape)
        return Volume(hu, affine, tuple(str(k) for k in range(shape[0])), "1.2.3", "HFS")

    def test_a_grid_inflated_by_spacing_is_refused_before_resampling(self, predictor: Predictor) -> None:
        # 100 x 512 x 512 with 20x the spacing (50 mm slices, 18 mm pixels): 1.2e11 voxels at 1.5 mm.
        volume = self._volume((100, 512, 512), (50.0, 18.0, 18.0))
        with pytest.raises(VolumeError) as caught:
            predictor.predict(volume)
        assert caught.value.reason == "model_grid_too_large"
        assert "3301 x 6133 x 6133" in str(caught.value)

    def test_the_grid_checked_is_the_grid_predicted_on(self, predictor: Predictor) -> None:
        volume = self._volume((20, 30, 30), (2.5, 1.0, 1.0))
        (grid,) = predictor.grid_shapes(volume.shape, volume.spacing)
        assert predictor.probabilities(volume).shape[1:] == grid == (32, 20, 20)
        assert predictor.probabilities(volume, max_voxels=32 * 20 * 20).shape[1:] == grid
        with pytest.raises(VolumeError, match=r"^model_grid_too_large: 32 x 20 x 20 voxels"):
            predictor.predict(volume, max_voxels=32 * 20 * 20 - 1)

    def test_a_prefilter_grid_is_checked_too(self, tmp_path: Path) -> None:
        threshold_network(tmp_path / "f" / "model.onnx")
        folder = manifest(tmp_path / "f", spacing=(3.0, 3.0, 3.0))
        toml = folder / "manifest.toml"
        prefilter = 'prefilter = { kind = "median", size = 3, spacing_mm = [1, 1, 1] }'
        toml.write_text(toml.read_text().replace("padding_hu = -1024", f"padding_hu = -1024\n{prefilter}"))
        predictor = Predictor(load_model_package(folder))
        volume = self._volume((20, 30, 30), (2.5, 1.5, 1.5))
        assert predictor.grid_shapes(volume.shape, volume.spacing) == [(48, 44, 44), (16, 15, 15)]
        with pytest.raises(VolumeError, match="48 x 44 x 44"):
            predictor.predict(volume, max_voxels=48 * 44 * 44 - 1)
