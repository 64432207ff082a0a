"""A real power cut: no C-STORE success is answered before the instance survives one.

The node's ``data_dir`` is an ext4 file system on a loop device, mounted with ``commit=600`` so that only
the node's own flushes reach the device during the test. The node is frozen mid-transfer and the loop
device's backing file copied at once: the copy holds what the node flushed, not its page cache. The copy is
then mounted in place of the original (ext4 replays its journal) and the node restarted on it.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.conftest import CTSeries, NodeProcess, dataset_bytes, dcmtk_env, require_tool, spooled_by_sop

_SUCCESS = re.compile(r"Received Store Response \(Success\)")
_DISK_BYTES = 384 << 20
_ACKNOWLEDGED_BEFORE_CUT = 25
#: Written without a flush just before the cut: the copy must not hold it whole.
_CANARY = b"POWERCUT" * (1 << 17)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a system tool (losetup, mount, ...) and return its result, whatever its exit status."""
    return subprocess.run([require_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=60)


def _must(*cmd: str) -> str:
    """Run a system tool; fail (never skip: CI runs as root) when it does not succeed."""
    result = _run(*cmd)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()} "
                    "(this test needs root and loop devices)")
    return result.stdout.strip()


def _attach(image: Path) -> str:
    """Attach *image* to a free loop device and return the device (retried: another test may race for it)."""
    for _attempt in range(5):
        result = _run("losetup", "--find", "--show", str(image))
        if result.returncode == 0:
            return result.stdout.strip()
        time.sleep(0.2)
    return _must("losetup", "--find", "--show", str(image))


@dataclass
class LoopDisk:
    """An ext4 file system in a backing file, mounted on *mount_point* through loop *device*."""

    image: Path
    mount_point: Path
    device: str = ""
    mounted: bool = False

    def mount(self) -> None:
        """Attach the image and mount it with no periodic journal commit (only explicit flushes persist)."""
        self.device = _attach(self.image)
        _must("mount", "-t", "ext4", "-o", "commit=600", self.device, str(self.mount_point))
        self.mounted = True

    def release(self) -> None:
        """Unmount (lazily: never blocks a teardown) and detach the loop device."""
        if self.mounted:
            _run("umount", "-l", str(self.mount_point))
            self.mounted = False
        if self.device:
            _run("losetup", "-d", self.device)
            self.device = ""

    def power_cut(self) -> None:
        """Keep only what reached the device: copy the backing file, then mount the copy in its place."""
        copy = self.image.with_name(self.image.name + ".cut")
        _must("cp", "--sparse=always", str(self.image), str(copy))
        self.release()
        self.image.unlink()
        self.image = copy
        self.mount()


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[LoopDisk]:
    """A fresh 384 MiB ext4 loop disk mounted on ``tmp_path/var``; unmounted and detached at teardown.

    Request it before ``node_factory``: fixtures are torn down in reverse, so the nodes stop first.
    """
    image = tmp_path / "disk.img"
    with image.open("wb") as handle:
        handle.truncate(_DISK_BYTES)
    _must("mkfs.ext4", "-q", "-F", "-b", "4096", str(image))
    disk = LoopDisk(image, tmp_path / "var")
    disk.mount_point.mkdir()
    try:
        disk.mount()
        yield disk
    finally:
        disk.release()


def _group_states(pgid: int) -> dict[int, str]:
    """The scheduler state (``R``, ``S``, ``D``, ``T``, ``Z``...) of every process in group *pgid*."""
    states = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            states[int(entry.name)] = fields[0]
    return states


def _wait_group(pgid: int, allowed: set[str], what: str) -> None:
    """Wait until every process of group *pgid* is in one of the *allowed* states (zombies count as gone)."""
    deadline = time.monotonic() + 10
    while not set(_group_states(pgid).values()) <= allowed | {"Z", "X"}:
        assert time.monotonic() < deadline, f"node processes not {what}: {_group_states(pgid)}"
        time.sleep(0.01)


def _freeze(node: NodeProcess) -> None:
    """SIGSTOP the node's process group and wait until each process is stopped (no system call in flight)."""
    os.killpg(node.process.pid, signal.SIGSTOP)
    _wait_group(node.process.pid, {"T", "t"}, "stopped")


def _kill(node: NodeProcess) -> None:
    """SIGKILL the node's process group and wait until none of its processes holds a file open."""
    node.kill9()  # SIGKILL ends stopped processes too; waits for the group leader only
    _wait_group(node.process.pid, set(), "gone")


def _storescu(port: int, files: list[Path], log: Path) -> subprocess.Popen[bytes]:
    """Send *files* on one association, logging each response to *log*."""
    cmd = [require_tool("storescu"), "-v", "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1", str(port),
           *map(str, files)]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env())


def _successes(log: Path) -> int:
    """How many C-STORE successes the sender has received so far."""
    return len(_SUCCESS.findall(log.read_text(errors="replace")))


def _wait_successes(sender: subprocess.Popen[bytes], log: Path, count: int) -> None:
    """Wait until *count* instances are acknowledged while the transfer is still running."""
    deadline = time.monotonic() + 60
    while _successes(log) < count:
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        assert sender.poll() is None, "transfer finished before the cut: " + log.read_text(errors="replace")[-2000:]
        time.sleep(0.005)


def _registered_count(data_dir: Path) -> int:
    """Instances registered in the job database."""
    with sqlite3.connect(data_dir / "gateway.db") as db:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])


def _assert_intact(stored: dict[str, bytes], series: CTSeries) -> None:
    """Every stored instance is, byte for byte, the data set that was sent."""
    sent = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in series.files}
    for uid, raw in stored.items():
        assert dataset_bytes(raw) == dataset_bytes(sent[uid]), f"instance {uid} differs from what was sent"


def test_every_acknowledged_instance_survives_a_power_cut(
        loop_disk: LoopDisk, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries],
        tmp_path: Path) -> None:
    data_dir = loop_disk.mount_point  # the key file lies beside it, off the loop disk
    node = node_factory(data_dir=data_dir, extra_node="min_free_disk_mb = 16",  # the default 1 GiB > this disk
                        peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "quiet_seconds": 30}])
    series = ct_series(120, size=256)
    log = tmp_path / "storescu.log"
    sender = _storescu(node.port, series.files, log)
    _wait_successes(sender, log, _ACKNOWLEDGED_BEFORE_CUT)
    canary = data_dir / "canary.bin"
    canary.write_bytes(_CANARY)  # no flush: a power cut loses it
    _freeze(node)
    loop_disk.power_cut()  # copies the backing file at once, before anything else can reach the device
    _kill(node)
    sender.wait(timeout=30)
    acknowledged = _successes(log)
    assert _ACKNOWLEDGED_BEFORE_CUT <= acknowledged < len(series.files)

    # The control: a copy that held unflushed data would model a clean shutdown, not a power cut.
    assert not (canary.exists() and canary.read_bytes() == _CANARY), "unflushed data survived the cut"
    canary.unlink(missing_ok=True)

    restarted = node_factory(config_path=node.config_path, data_dir=data_dir)
    present = spooled_by_sop(data_dir)
    missing = set(series.sop_uids[:acknowledged]) - set(present)
    assert not missing, f"{len(missing)} of {acknowledged} acknowledged instances lost in the power cut"
    _assert_intact(present, series)
    assert _registered_count(data_dir) == len(present)

    # The sender retries everything: each instance ends up stored exactly once.
    assert _storescu(restarted.port, series.files, tmp_path / "retry.log").wait(timeout=120) == 0
    stored = spooled_by_sop(data_dir)
    assert sorted(stored) == sorted(series.sop_uids)
    _assert_intact(stored, series)
    assert _registered_count(data_dir) == len(series.sop_uids)
