"""`make demo` and the per-route QA picture: contours a physicist can check without the TPS."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from gateway.inference.manifest import load_model_package
from tests.conftest import REPO, NodeProcess, dcmtk_env, require_tool
from tests.synthetic import couch_phantom, write_volume_series

COLOURS = {label.name: tuple(label.colour) for label in load_model_package(REPO / "models" / "default").manifest.labels}


def _pixels_of(png: bytes, colour: tuple[int, ...]) -> int:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return int(np.all(image == np.array(colour), axis=-1).sum())


def test_the_demo_prints_the_structures_and_draws_them(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(tmp_path / "out"),
                             "--slices", "30", "--size", "160"], capture_output=True, text=True, cwd=REPO,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()
            and line.split()[0] in COLOURS}
    assert set(rows) == set(COLOURS)
    assert all(float(volume) > 0 and int(contours) > 0 for volume, contours in rows.values())
    png = (tmp_path / "out" / "qa-phantom.png").read_bytes()
    for name, colour in COLOURS.items():
        assert _pixels_of(png, colour) > 20, f"no outline of {name}"


def test_a_route_keeps_a_sealed_qa_picture_until_the_study_is_shredded(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    volume, _ = couch_phantom(shape=(30, 160, 160), spacing=(4.0, 2.6, 2.6))
    ct = write_volume_series(tmp_path / "ct", volume)
    route = {"name": "thorax", "match": {"Modality": "CT"}, "model": "default", "destinations": ["folder"],
             "qa_picture": True, "structures": {"External": {"name": "BODY"}}}
    node = node_factory(destinations=[{"name": "folder", "type": "folder"}], routes=[route],
                        extra="[retention]\nkeep_after_delivery_seconds = 3600")
    sent = subprocess.run([require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                           str(node.port), *map(str, ct.files)], capture_output=True, env=dcmtk_env(), timeout=60)
    assert sent.returncode == 0
    job_id = node.wait_for("job_done", timeout=90)["job_id"]
    sealed = list((node.data_dir / "results" / job_id).glob("t1.qa-png"))
    assert sealed and not sealed[0].read_bytes().startswith(b"\x89PNG")  # encrypted at rest

    def qa() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "qa", "--config", str(node.config_path), job_id,
                               "--out", str(tmp_path / "qa.png")], capture_output=True, text=True, cwd=REPO,
                              timeout=60, check=False)

    assert qa().returncode == 0
    png = (tmp_path / "qa.png").read_bytes()
    assert (tmp_path / "qa.png").stat().st_mode & 0o777 == 0o600
    assert _pixels_of(png, COLOURS["External"]) > 20  # renamed BODY by the template, same colour
    assert _pixels_of(png, COLOURS["Lung_L"]) > 20
    assert node.stop() == 0
    with sqlite3.connect(node.data_dir / "gateway.db") as db:
        db.execute("UPDATE jobs SET created_at = created_at - 86400")
    shred = subprocess.run([sys.executable, "-m", "gateway", "shred", "--config", str(node.config_path)],
                           capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert shred.returncode == 0
    assert qa().returncode == 1
