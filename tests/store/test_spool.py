"""Durability of the spool: kill -9 mid-transfer, a full disk, and the write protocol itself."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from gateway.errors import SpoolError
from gateway.store.spool import Spool
from tests.conftest import (
    CTSeries,
    NodeProcess,
    dataset_bytes,
    dcmtk_env,
    require_tool,
    spooled_by_sop,
)

_SUCCESS = re.compile(r"Received Store Response \(Success\)")


def _registered_count(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "gateway.db") as db:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])


def _storescu(port: int, files: list[Path], log: Path) -> subprocess.Popen[bytes]:
    cmd = [require_tool("storescu"), "-v", "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1", str(port),
           *map(str, files)]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env())


def test_kill9_mid_transfer_keeps_every_acknowledged_instance(
        node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries], tmp_path: Path) -> None:
    node = node_factory(peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "quiet_seconds": 30}])
    series = ct_series(120, size=256)
    log = tmp_path / "storescu.log"
    sender = _storescu(node.port, series.files, log)
    deadline = time.monotonic() + 60
    while len(_SUCCESS.findall(log.read_text(errors="replace"))) < 25:
        assert time.monotonic() < deadline, log.read_text()
        assert sender.poll() is None, "transfer finished before the kill: " + log.read_text()[-2000:]
        time.sleep(0.005)
    node.kill9()
    sender.wait(timeout=30)
    acknowledged = len(_SUCCESS.findall(log.read_text(errors="replace")))
    assert 25 <= acknowledged < len(series.files)

    restarted = node_factory(config_path=node.config_path)
    present = set(spooled_by_sop(node.data_dir))
    assert set(series.sop_uids[:acknowledged]) <= present
    assert not list((node.data_dir / "spool").glob("*/.*.tmp"))
    assert _registered_count(node.data_dir) == len(present)

    # The sender retries everything: each instance ends up stored exactly once, in one job.
    again = _storescu(restarted.port, series.files, tmp_path / "retry.log")
    assert again.wait(timeout=120) == 0
    assert sorted(spooled_by_sop(node.data_dir)) == sorted(series.sop_uids)
    assert _registered_count(node.data_dir) == len(series.sop_uids)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real full disk (CI runs as root, like every machine of this project)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_answers_out_of_resources_and_leaves_no_partial_file(
        node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries], tiny_disk: Path,
        tmp_path: Path) -> None:
    data_dir = tiny_disk / "var"
    node = node_factory(data_dir=data_dir, extra_node="min_free_disk_mb = 0")  # no watermark: the write fails
    series = ct_series(12, size=512)  # 12 x 512 KB cannot fit in 4 MiB
    log = tmp_path / "storescu.log"
    _storescu(node.port, series.files, log).wait(timeout=120)
    output = log.read_text(errors="replace")
    assert re.search(r"Refused: OutOfResources", output, re.IGNORECASE), output[-3000:]
    failed = node.wait_for("store_failed")
    assert failed["status"] == "0xA700"

    assert not list(data_dir.glob("spool/*/.*.tmp"))
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in series.files}
    stored = spooled_by_sop(data_dir)
    assert 0 < len(stored) < len(series.files)
    for uid, raw in stored.items():
        assert dataset_bytes(raw) == dataset_bytes(by_uid[uid])
    assert _registered_count(data_dir) == len(stored)

    echo = subprocess.run([require_tool("echoscu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30)
    assert echo.returncode == 0, "the node must stay up when its disk is full"


def test_below_the_free_space_watermark_stores_and_associations_are_refused(
        node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries], tiny_disk: Path,
        tmp_path: Path) -> None:
    data_dir = tiny_disk / "var"
    node = node_factory(data_dir=data_dir, extra_node="min_free_disk_mb = 2")
    series = ct_series(12, size=512)
    log = tmp_path / "storescu.log"
    _storescu(node.port, series.files, log).wait(timeout=120)
    assert re.search(r"Refused: OutOfResources", log.read_text(errors="replace"), re.IGNORECASE)
    refused = node.wait_for("store_refused", reason="disk_space_low")
    assert refused["status"] == "0xA700"
    assert not any(e["event"] == "store_failed" for e in node.events()), "refused before writing, not failed"
    assert 0 < len(spooled_by_sop(data_dir)) < len(series.files)
    echo = subprocess.run([require_tool("echoscu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30)
    assert echo.returncode != 0
    assert "Rejected Transient" in echo.stdout + echo.stderr
    assert node.wait_for("association_rejected", reason="disk_space_low")


class TestWriteProtocol:
    def test_write_is_atomic_and_owner_only(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "var")
        spool.prepare()
        job_id = "0123456789abcdef"
        file_id, size = spool.write_instance(job_id, [b"head", memoryview(b"body")])
        path = spool.instance_path(job_id, file_id)
        assert path.read_bytes() == b"headbody"
        assert size == 8
        assert path.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in path.parent.iterdir()] == [path.name]

    def test_failed_write_removes_the_temporary(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        spool = Spool(tmp_path / "var")
        spool.prepare()
        job_id = "0123456789abcdef"

        def no_space(fd: int, data: object) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", no_space)
        with pytest.raises(SpoolError, match="ENOSPC"):
            spool.write_instance(job_id, [b"x" * 100])
        monkeypatch.undo()
        assert list((spool.root / job_id).iterdir()) == []

    @pytest.mark.parametrize("bad", ["../etc", "1.2.840.10008", "ABCDEF0123456789", ""])
    def test_paths_are_built_only_from_server_ids(self, tmp_path: Path, bad: str) -> None:
        spool = Spool(tmp_path / "var")
        with pytest.raises(ValueError, match="not a spool id"):
            spool.job_dir(bad)

    def test_leftover_temporaries_are_removed(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "var")
        spool.prepare()
        folder = spool.job_dir("0123456789abcdef")
        (folder / ".deadbeefdeadbeefdeadbeefdeadbeef.tmp").write_bytes(b"partial")
        assert spool.remove_temporaries() == 1
        assert list(folder.iterdir()) == []
