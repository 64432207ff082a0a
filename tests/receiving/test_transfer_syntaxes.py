"""Compressed CT made by real encoders (dcmtk, OpenJPEG) is accepted as sent and decodes losslessly."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    UID,
    CTImageStorage,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE

from tests.conftest import CTSeries, NodeProcess, dataset_bytes, dcmtk_env, require_tool, spooled_plaintext


def _dcmtk_encode(tool: str, *options: str) -> Callable[[Path, Path], None]:
    def encode(source: Path, target: Path) -> None:
        subprocess.run([require_tool(tool), *options, str(source), str(target)], check=True,
                       capture_output=True, timeout=60)
    return encode


def _openjpeg_encode(source: Path, target: Path) -> None:
    ds = pydicom.dcmread(source)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.save_as(target, enforce_file_format=True)


#: transfer syntax -> (encoder, storescu option proposing exactly it; None: storescu has none)
ENCODERS: dict[UID, tuple[Callable[[Path, Path], None], str | None]] = {
    JPEGLosslessSV1: (_dcmtk_encode("dcmcjpeg", "+e1"), "-xs"),
    JPEGLossless: (_dcmtk_encode("dcmcjpeg", "+el"), None),
    JPEGLSLossless: (_dcmtk_encode("dcmcjpls", "+el"), "-xt"),
    RLELossless: (_dcmtk_encode("dcmcrle"), "-xr"),
    JPEG2000Lossless: (_openjpeg_encode, "-xv"),
}


def _send(port: int, files: list[Path], syntax: UID, storescu_option: str | None) -> None:
    if storescu_option is not None:
        result = subprocess.run([require_tool("storescu"), storescu_option, "-aet", "PACS", "-aec", "CONTOUR_GW",
                                 "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True,
                                env=dcmtk_env(), timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Converting transfer syntax" not in result.stdout + result.stderr
        return
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="CONTOUR_GW")
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.parametrize("syntax", list(ENCODERS), ids=lambda uid: UID(uid).name)
def test_compressed_series_is_stored_as_sent_and_decodes_losslessly(
        syntax: UID, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries],
        tmp_path: Path) -> None:
    series = ct_series(3, size=128)
    compressed = []
    for source in series.files:
        target = tmp_path / "compressed" / source.name
        target.parent.mkdir(exist_ok=True)
        ENCODERS[syntax][0](source, target)
        assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == syntax
        compressed.append(target)
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p).pixel_array for p in series.files}
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in compressed}

    node = node_factory()
    _send(node.port, compressed, syntax, ENCODERS[syntax][1])

    stored = spooled_plaintext(node.data_dir)
    assert len(stored) == len(compressed)
    for raw in stored.values():
        ds = pydicom.dcmread(io.BytesIO(raw))
        assert ds.file_meta.TransferSyntaxUID == syntax
        uid = str(ds.SOPInstanceUID)
        assert dataset_bytes(raw) == dataset_bytes(by_uid[uid])
        np.testing.assert_array_equal(ds.pixel_array, originals[uid])
