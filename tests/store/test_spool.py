"""Durability of the spool: kill -9 mid-transfer, a full disk, and the write protocol itself."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import threading
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
    group_memory_kib,
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


_JOB = "0123456789abcdef"


def _fresh_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "var")
    spool.prepare()
    return spool


class TestWriteProtocol:
    def test_an_instance_is_a_record_in_an_owner_only_segment(self, tmp_path: Path) -> None:
        spool = _fresh_spool(tmp_path)
        first, size = spool.write_instance(_JOB, [b"head", memoryview(b"body")])
        second, _ = spool.write_instance(_JOB, [b"second"])
        assert size == 8 and spool.instance_size(_JOB, first) == 8
        assert spool.read_instance(_JOB, first) == b"headbody"
        assert spool.read_instance(_JOB, second) == b"second"
        assert spool.file_ids(_JOB) == [first, second]
        [segment] = (spool.root / _JOB).iterdir()  # one file for the job's instances, whatever their number
        assert segment.suffix == ".seg" and segment.stat().st_mode & 0o777 == 0o600
        assert segment.stat().st_size >= 1 << 20  # pre-allocated ahead of the writes
        spool.close_idle_segments(0)
        assert segment.stat().st_size == 2 * 4096  # cut to its records (4 KiB aligned) when closed
        assert spool.file_ids(_JOB) == [first, second]

    def test_every_instance_is_flushed_once_and_concurrent_writers_share_flushes(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        spool = _fresh_spool(tmp_path)
        spool.write_instance(_JOB, [b"first"])  # the segment exists
        flushes: list[int] = []
        real_fdatasync = os.fdatasync

        def slow_fdatasync(fd: int) -> None:  # a slow disk: writers queue behind one flush
            flushes.append(fd)
            time.sleep(0.02)
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
        monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync on the instance write path"))
        written: list[tuple[str, bytes]] = []

        def writer(index: int) -> None:
            for n in range(10):
                payload = f"w{index}-{n}".encode() * 100
                written.append((spool.write_instance(_JOB, [payload])[0], payload))

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(written) == 40
        assert 1 <= len(flushes) < 40, "four writers on one segment share their flushes"
        for file_id, payload in written:
            assert spool.read_instance(_JOB, file_id) == payload

    def test_a_failed_write_leaves_no_record(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        spool = _fresh_spool(tmp_path)
        kept, _ = spool.write_instance(_JOB, [b"kept"])

        def no_space(*_args: object) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "pwritev", no_space)
        with pytest.raises(SpoolError, match="ENOSPC"):
            spool.write_instance(_JOB, [b"x" * 100])
        monkeypatch.undo()
        assert spool.file_ids(_JOB) == [kept]
        again, _ = spool.write_instance(_JOB, [b"again"])  # a new segment: the failed one was closed
        assert sorted(spool.file_ids(_JOB)) == sorted([kept, again])

    def test_a_full_disk_gets_exactly_the_space_an_instance_needs(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        spool = _fresh_spool(tmp_path)
        real_fallocate = os.posix_fallocate
        asked: list[int] = []

        def nearly_full(fd: int, offset: int, length: int) -> None:
            asked.append(length)
            if length > 8192:
                raise OSError(28, "No space left on device")
            real_fallocate(fd, offset, length)

        monkeypatch.setattr(os, "posix_fallocate", nearly_full)
        file_id, _ = spool.write_instance(_JOB, [b"small"])
        assert asked == [1 << 20, 24 + 5]
        with pytest.raises(SpoolError, match="ENOSPC"):
            spool.write_instance(_JOB, [b"x" * 10_000])
        assert spool.file_ids(_JOB) == [file_id]

    def test_reading_stops_at_a_torn_record_and_skips_removed_ones(self, tmp_path: Path) -> None:
        spool = _fresh_spool(tmp_path)
        ids = [spool.write_instance(_JOB, [bytes([n]) * 5000])[0] for n in range(4)]
        spool.remove_instance(_JOB, ids[1])
        with pytest.raises(FileNotFoundError):
            spool.read_instance(_JOB, ids[1])
        spool.close_idle_segments(0)
        [segment] = (spool.root / _JOB).iterdir()
        raw = bytearray(segment.read_bytes())
        assert bytes([1]) * 5000 not in raw, "a removed record is zeroed"
        raw[3 * 8192 + 10] ^= 0xFF  # the last record's header torn by a power cut
        segment.write_bytes(raw)
        assert spool.file_ids(_JOB) == [ids[0], ids[2]]
        with pytest.raises(FileNotFoundError):
            spool.read_instance(_JOB, ids[3])

    def test_removing_a_job_leaves_the_segments_of_the_others_whole(self, tmp_path: Path) -> None:
        """Segments hold one job each: shredding a study removes its own folder, and a study received at the same
        time, by the same receiver, keeps every instance byte for byte."""
        spool = _fresh_spool(tmp_path)
        other = "f" * len(_JOB)
        written = {job: [] for job in (_JOB, other)}
        for n in range(6):  # interleaved, as two associations write them
            for job in (_JOB, other):
                payload = bytes([n]) * 3000 + job.encode()
                written[job].append((spool.write_instance(job, [payload])[0], payload))
        kept = {path: path.read_bytes() for path in (spool.root / other).iterdir()}
        assert spool.remove_job(_JOB)["received"] == 6
        assert not (spool.root / _JOB).exists()
        assert {path: path.read_bytes() for path in (spool.root / other).iterdir()} == kept
        assert [spool.read_instance(other, file_id) for file_id, _ in written[other]] == [
            payload for _, payload in written[other]]

    def test_an_older_spool_of_one_file_per_instance_is_still_read(self, tmp_path: Path) -> None:
        spool = _fresh_spool(tmp_path)
        record, _ = spool.write_instance(_JOB, [b"record"])
        legacy = "0123456789abcdef0123456789abcdef"
        (spool.root / _JOB / f"{legacy}.dcm").write_bytes(b"legacy")
        assert sorted(spool.file_ids(_JOB)) == sorted([record, legacy])
        assert spool.read_instance(_JOB, legacy) == b"legacy" and spool.instance_size(_JOB, legacy) == 6
        assert spool.remove_job(_JOB)["received"] == 2
        assert not (spool.root / _JOB).exists()

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


def _open_spool_files(node: NodeProcess) -> list[str]:
    """Files under the node's spool that one of its processes holds open."""
    spool = str(node.data_dir / "spool")
    found = []
    for pid in group_memory_kib(node.process.pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(spool):
                        found.append(target)
    return found


def test_a_received_study_leaves_no_segment_open_and_none_oversized(
        node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries], tmp_path: Path) -> None:
    node = node_factory(peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "quiet_seconds": 30}])
    series = ct_series(6, size=256)
    assert _storescu(node.port, series.files, tmp_path / "storescu.log").wait(timeout=60) == 0
    assert _open_spool_files(node), "a receiver keeps the job's segment open while the study arrives"
    deadline = time.monotonic() + 30
    while _open_spool_files(node) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Closed once idle: shredding the job then frees its blocks at once, and no pre-allocated space is left.
    assert _open_spool_files(node) == []
    spool = Spool(node.data_dir)
    [job_id] = list(spool.job_ids())
    needed = sum(-(-(spool.instance_size(job_id, file_id) + 24) // 4096) * 4096 for file_id in spool.file_ids(job_id))
    assert len(spool.file_ids(job_id)) == len(series.files)
    assert sum(p.stat().st_size for p in (spool.root / job_id).iterdir()) == needed
