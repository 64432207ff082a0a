"""The command line an admin uses: status, complete, echo (exit codes and output without patient data)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import Peer
from gateway.receiving.assembly import Assembler, IncomingInstance
from gateway.store.jobs import JobStore
from gateway.store.spool import Spool
from tests.conftest import REPO, dcmtk_env, free_port, key_ring, node_key_file, require_tool, write_config

STUDY_UID = "1.2.840.99.12345"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.fixture
def storescp_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    process = subprocess.Popen([require_tool("storescp"), "-aet", "TPS", "-od", str(out), str(port)],
                               env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            probe = subprocess.run([require_tool("echoscu"), "-aec", "TPS", "127.0.0.1", str(port)],
                                   capture_output=True, env=dcmtk_env(), timeout=10)
            if probe.returncode == 0:
                break
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_status_and_complete(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var")
    spool = Spool(tmp_path / "var")
    spool.prepare()
    jobs = JobStore(spool.database_path)
    peer = Peer(name="pacs", ae_title="PACS", host="127.0.0.1")
    assembler = Assembler(spool, jobs, key_ring(tmp_path / "keys"))
    assembler.accept(IncomingInstance(STUDY_UID, STUDY_UID + ".1", (b"x",)), peer)
    [job] = jobs.jobs()
    jobs.close()

    status = cli(config, "status")
    assert status.returncode == 0, status.stderr
    assert job.job_id in status.stdout and "receiving" in status.stdout
    assert STUDY_UID not in status.stdout
    done = cli(config, "complete", job.job_id)
    assert done.returncode == 0, done.stderr
    assert f"{job.job_id} complete" in done.stdout
    assert "complete" in cli(config, "status").stdout
    missing = cli(config, "complete", "ffffffffffffffff")
    assert missing.returncode == 1
    assert "no job with id 'ffffffffffffffff'" in missing.stderr


def test_status_before_first_start(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var")
    result = cli(config, "status")
    assert result.returncode == 0
    assert "no jobs" in result.stdout


def test_echo_a_destination(tmp_path: Path, storescp_port: int) -> None:
    closed = free_port()
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var", destinations=[
        {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": storescp_port},
        {"name": "down", "ae_title": "TPS", "host": "127.0.0.1", "port": closed, "connect_timeout_seconds": 2},
    ])
    ok = cli(config, "echo", "tps")
    assert ok.returncode == 0, ok.stderr
    assert "echo tps: success" in ok.stdout
    down = cli(config, "echo", "down")
    assert down.returncode == 1
    assert "connection failed" in down.stderr
    unknown = cli(config, "echo", "nowhere")
    assert unknown.returncode == 2
    assert "known: tps, down" in unknown.stderr


def test_serve_reports_a_port_in_use_and_an_unusable_data_dir(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "gateway.toml", tmp_path / "var", port=port)
        result = cli(config, "serve")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr
    assert "Traceback" not in result.stderr

    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    key = f'[encryption]\nmaster_key_file = "{node_key_file(tmp_path / "var")}"'
    config = write_config(tmp_path / "gateway2.toml", blocker / "var", extra=key)
    result = cli(config, "serve")
    assert result.returncode == 1
    assert "cannot use data_dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_reports_a_damaged_master_key(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "master.key"  # where write_config's node looks for it
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(b"not 32 bytes")
    result = cli(write_config(tmp_path / "gateway.toml", tmp_path / "var"), "serve")
    assert result.returncode == 2
    assert f"master key file {key_file} is damaged" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_route_naming_a_missing_or_invalid_model(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var", models_dir=tmp_path / "models", destinations=[
        {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 4242}])
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "manifest.toml").write_text("[model]\nname = 'x'\n")
    with config.open("a") as extra:
        extra.write('\n[[routes]]\nname = "ct"\nmodel = "absent"\ndestinations = ["tps"]\n'
                    '\n[[routes]]\nname = "other"\nmodel = "broken"\ndestinations = ["tps"]\n')
    result = cli(config, "serve")
    assert result.returncode == 2
    assert "routes[0]: model 'absent' has no package folder" in result.stderr
    assert "model 'broken': model.onnx: missing" in result.stderr
    assert "model 'broken': manifest.toml input: Field required" in result.stderr


def test_the_embedded_default_configuration_names_a_valid_model() -> None:
    from gateway.config import load_config
    from gateway.inference.model_cache import check_route_models

    config = load_config(REPO / "config" / "gateway.toml")
    check_route_models(config.inference.models_dir, config.routes)
