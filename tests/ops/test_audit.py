"""The audit trail: hash chain, tamper detection, concurrent writers, the age check, syslog."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from gateway.ops.audit import AuditLog, verify
from tests.conftest import REPO, write_config

T0 = 1_800_000_000.0
DAY = 86_400


def _trail(path: Path) -> AuditLog:
    audit = AuditLog(path)
    audit.append("received", T0 + 5, job_id="a1", study="s1", first_instance_at=T0, instances=3)
    audit.append("pseudonymised", T0 + 6, job_id="a1", study="s1", instances=3)
    audit.append("deleted", T0 + 60, job_id="a1", study="s1", first_instance_at=T0, complete=True)
    audit.append("received", T0 + 70, job_id="b2", study="s2", first_instance_at=T0 + 65, instances=1)
    return audit


def test_an_intact_chain_verifies_and_reports_every_job(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _trail(path)
    result = verify(path, DAY, T0 + 100)
    assert result.ok and result.records == 4 and result.broken_links == []
    assert result.jobs["a1"].age(T0 + 100) == 60.0
    assert result.jobs["b2"].deleted_at is None and result.jobs["b2"].age(T0 + 100) == 35.0


def test_an_edited_or_removed_line_breaks_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _trail(path)
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["instances"] = 2
    path.write_text("\n".join([lines[0], json.dumps(edited, separators=(",", ":")), *lines[2:]]) + "\n")
    assert verify(path, DAY, T0 + 100).broken_links == [3]
    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    assert verify(path, DAY, T0 + 100).broken_links == [2]


def test_data_held_or_deleted_past_the_ceiling_fails(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _trail(path)
    assert verify(path, DAY, T0 + 65 + DAY + 1).over_ceiling == ["b2"]  # still held
    AuditLog(path).append("deleted", T0 + 65 + DAY + 1, job_id="b2", first_instance_at=T0 + 65, complete=True)
    assert verify(path, DAY, T0 + 2 * DAY).over_ceiling == ["b2"]  # deleted, but too late
    assert verify(path, 2 * DAY, T0 + 2 * DAY).ok


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    script = ("import sys; from pathlib import Path; from gateway.ops.audit import AuditLog\n"
              "a = AuditLog(Path(sys.argv[1]))\n"
              "for n in range(150): a.append('pseudonymised', 1.0, job_id=sys.argv[2] + str(n))")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), name], cwd=REPO) for name in "xy"]
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0]
    result = verify(path, DAY, 2.0)
    assert result.records == 300 and result.broken_links == []


def test_records_are_copied_to_syslog(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        audit = AuditLog(tmp_path / "audit.jsonl", syslog_address=f"127.0.0.1:{receiver.getsockname()[1]}")
        audit.append("deleted", T0, job_id="c3", complete=True)
        message = receiver.recv(65_536).decode()
    assert "contour-gateway-audit:" in message
    assert json.loads(message.split("contour-gateway-audit: ", 1)[1].rstrip("\x00"))["job_id"] == "c3"


def test_the_verify_command_exits_non_zero_on_a_broken_chain(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var")
    path = tmp_path / "var" / "audit" / "audit.jsonl"
    path.parent.mkdir(parents=True)
    _trail(path)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--config", str(config)],
                              capture_output=True, text=True, cwd=REPO, timeout=60, check=False)

    fine = run()
    assert fine.returncode == 0 and "OK" in fine.stdout and "a1" in fine.stdout
    path.write_text(path.read_text().replace('"instances":3', '"instances":4', 1))
    broken = run()
    assert broken.returncode == 1 and "chain broken at line 2" in broken.stderr
