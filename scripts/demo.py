"""Demo: a CT phantom (with a couch) in, automatic contours out, a QA picture to look at.

Starts a gateway node and a local receiving SCP (standing in for the TPS) on free ports, sends the
phantom study, waits for the RT Structure Set, prints each structure (name, volume in ml, number
of contours) and writes a PNG with the contours over axial, coronal and sagittal slices.
``make demo`` runs it; nothing outside the output folder and a temporary folder is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import RTStructureSetStorage
from pynetdicom import AE, evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gateway.inference.volume import volume_from_datasets  # noqa: E402
from gateway.rt.qa_picture import qa_picture, rtstruct_masks  # noqa: E402
from gateway.store.keys import create_key_file  # noqa: E402
from tests.synthetic import couch_phantom, write_volume_series  # noqa: E402 - the phantom the tests use


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _receiver(port: int, received: queue.Queue[Dataset]) -> Any:
    """A minimal Storage SCP standing in for the TPS: it keeps what it receives in memory."""
    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.put(ds)
        return 0x0000

    ae = AE(ae_title="DEMO_TPS")
    ae.add_supported_context(RTStructureSetStorage)
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _config(folder: Path, tps_port: int) -> Path:
    path = folder / "gateway.toml"
    key_file = folder / "keys" / "master.key"  # a key for this demo only, outside its data_dir
    if not key_file.exists():
        create_key_file(key_file)
    path.write_text(f"""
[node]
port = 0
data_dir = "{folder / 'var'}"
min_free_disk_mb = 0

[encryption]
master_key_file = "{key_file}"

[[peers]]
name = "demo"
ae_title = "*"
host = "127.0.0.1"
quiet_seconds = 1

[[destinations]]
name = "tps"
ae_title = "DEMO_TPS"
host = "127.0.0.1"
port = {tps_port}

[[routes]]
name = "thorax"
match = {{ Modality = "CT" }}
model = "default"
destinations = ["tps"]

[inference]
models_dir = "{REPO / 'models'}"

[metrics]
enabled = false
""")
    return path


def _node_port(log_path: Path, node: subprocess.Popen[bytes], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"node_started"' in line:
                return int(json.loads(line)["port"])
        if node.poll() is not None:
            raise SystemExit(f"the node exited:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit("the node did not start")


def _send(files: list[Path], port: int) -> None:
    ae = AE(ae_title="DEMO_PACS")
    ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CONTOUR_GW")
    if not assoc.is_established:
        raise SystemExit("the node refused the association")
    for path in files:
        status = assoc.send_c_store(path)
        if int(getattr(status, "Status", -1)) != 0:
            raise SystemExit(f"C-STORE failed: {status}")
    assoc.release()


def report(rtstruct: Dataset, ct: list[Dataset], out: Path) -> Path:
    """Print the structures and write the QA picture; return its path."""
    volume = volume_from_datasets(ct)
    masks = rtstruct_masks(rtstruct, volume)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    colours = {str(roi.ROIName): [int(c) for c in item.ROIDisplayColor]
               for roi, item in zip(rtstruct.StructureSetROISequence, rtstruct.ROIContourSequence, strict=True)}
    print(f"{'STRUCTURE':<16}{'VOLUME ML':>12}{'CONTOURS':>10}")
    for roi, item in zip(rtstruct.StructureSetROISequence, rtstruct.ROIContourSequence, strict=True):
        name = str(roi.ROIName)
        print(f"{name:<16}{masks[name].sum() * voxel_ml:>12.1f}{len(getattr(item, 'ContourSequence', [])):>10}")
    out.mkdir(parents=True, exist_ok=True)
    picture = out / "qa-phantom.png"
    picture.write_bytes(qa_picture(volume, masks, colours))
    print(f"QA picture: {picture}")
    return picture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO / "demo-output", help="where the QA picture goes")
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="contour-demo-") as tmp:
        folder = Path(tmp)
        spacing = 460.0 / args.size
        volume, _ = couch_phantom(shape=(args.slices, args.size, args.size), spacing=(3.0, spacing, spacing))
        series = write_volume_series(folder / "ct", volume, patient=("DEMO^PHANTOM", "DEMO0001"))
        received: queue.Queue[Dataset] = queue.Queue()
        tps_port = _free_port()
        tps = _receiver(tps_port, received)
        log_path = folder / "node.log"
        with log_path.open("wb") as log:
            node = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(_config(folder,
                                     tps_port))], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            print(f"node on port {_node_port(log_path, node)}, demo TPS on {tps_port}: sending "
                  f"{len(series.files)} CT slices")
            _send(series.files, _node_port(log_path, node))
            try:
                rtstruct = received.get(timeout=120)
            except queue.Empty:
                raise SystemExit(f"no RT Structure Set within 120 s:\n{log_path.read_text()[-3000:]}") from None
            report(rtstruct, [pydicom.dcmread(path) for path in series.files], args.out)
        finally:
            node.terminate()
            node.wait(timeout=60)
            tps.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
