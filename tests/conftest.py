"""Shared fixtures: free ports, synthetic CT series with canary PHI, a node run as a real process."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pydicom
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import GatewayConfig, parse_config
from gateway.ops.process import ProcessSettings
from gateway.store.jobs import JobStore
from gateway.store.keys import KekFiles, KeyRing, MasterKey, create_key_file
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool
from tests.synthetic import (
    CANARY_ACCESSION,
    CANARY_BIRTH,
    CANARY_ID,
    CANARY_NAME,
    CANARY_STUDY_PREFIX,
    CTSeries,
    make_ct_series,
)

__all__ = ["CANARY_ACCESSION", "CANARY_BIRTH", "CANARY_ID", "CANARY_NAME", "CANARY_STUDY_PREFIX", "CTSeries",
           "make_ct_series"]

REPO = Path(__file__).resolve().parents[1]

#: Fixtures of other helper modules, for every test.
pytest_plugins = ["tests.triton_farm"]

def canaries(series: CTSeries) -> list[str]:
    """Every PHI-like value of *series* that must never appear in a sink."""
    return [CANARY_NAME, "CANARY", CANARY_ID, CANARY_BIRTH, CANARY_ACCESSION, series.study_uid,
            series.series_uid, *series.sop_uids]


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as the module *name*, loaded once (dataclasses look their module up)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """Return a TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """Return the path of a Debian test peer; fail (never skip) when `make test` did not install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"test peer {name!r} is missing: run `make test`, which installs it")
    return path


@pytest.fixture
def ct_series(tmp_path: Path) -> Callable[..., CTSeries]:
    """Factory: ``ct_series(count=8, name="ct", ...)`` writes a series under tmp_path."""
    def factory(count: int = 8, name: str = "ct", **kwargs: Any) -> CTSeries:
        return make_ct_series(tmp_path / name, count, **kwargs)
    return factory


def toml_value(value: Any) -> str:
    """*value* as a TOML value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value) if isinstance(value, Path) else value)


def write_config(path: Path, data_dir: Path, *, port: int = 0, peers: list[dict[str, Any]] | None = None,
                 destinations: list[dict[str, Any]] | None = None, routes: list[dict[str, Any]] | None = None,
                 extra_node: str = "", extra: str = "", max_associations: int = 8,
                 models_dir: Path = REPO / "models", extra_inference: str = "") -> Path:
    """Write a gateway TOML for tests; peers default to any AE on loopback with a 1 s quiet period.

    Models come from *models_dir* (the repository's ``models/``); *extra_inference* goes into ``[inference]``
    (keys, then its sub-tables), *extra* is appended as raw TOML.
    """
    peers = peers if peers is not None else [{"name": "local", "ae_title": "*", "host": "127.0.0.1",
                                              "quiet_seconds": 1}]
    lines = ["[node]", 'ae_title = "CONTOUR_GW"', 'bind = "127.0.0.1"', f"port = {port}",
             f'data_dir = "{data_dir}"', f"max_associations = {max_associations}", extra_node, ""]
    for name, entries in (("peers", peers), ("destinations", destinations or []), ("routes", routes or [])):
        for entry in entries:
            lines += [f"[[{name}]]", *(f"{k} = {toml_value(v)}" for k, v in entry.items()), ""]
    lines += ["[inference]", f'models_dir = "{models_dir}"', extra_inference, "", "[metrics]", "port = 0", "",
              "[logging]",
              'level = "debug"', extra]
    if "[encryption]" not in extra:
        lines += ["", "[encryption]", f'master_key_file = "{node_key_file(data_dir)}"']
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class NodeProcess:
    """A gateway node started with ``python -m gateway serve`` in its own process group."""

    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    port: int = 0
    tls_port: int = 0
    data_dir: Path = field(default_factory=Path)
    log_offset: int = 0

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample the node's ``/metrics`` shows now: (name, sorted labels) -> value."""
        port = int(self.wait_for("node_started")["metrics_port"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(body) for sample in family.samples}

    def log_text(self) -> str:
        """What this process (not an earlier one on the same log) has written."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far."""
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "<not json>", "line": line})
        return out

    def wait_for(self, event: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """Wait until a log event named *event* with *fields* appears; return it.

        The deadline only bounds a failure: a busy machine may be several times slower than a quiet one.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.events():
                if item.get("event") == event and all(item.get(k) == v for k, v in fields.items()):
                    return item
            if self.process.poll() is not None:
                raise AssertionError(f"node exited ({self.process.returncode}) before {event!r}:\n"
                                     + self.log_text()[-4000:])
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} event within {timeout} s:\n" + self.log_text()[-4000:])

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL the whole process group (the node and its receiver processes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def start_node(config_path: Path, log_path: Path, env: dict[str, str] | None = None) -> NodeProcess:
    """Start a node from *config_path* (extra environment *env*) and wait until it accepts associations."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
    node = NodeProcess(config_path, log_path, process, log_offset=offset)
    started = node.wait_for("node_started", timeout=120)
    node.port = int(started["port"] or 0)
    node.tls_port = int(started["tls_port"] or 0)
    return node


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Factory starting real node processes; every one is stopped (or killed) at teardown."""
    started: list[NodeProcess] = []

    def factory(config_path: Path | None = None, env: dict[str, str] | None = None,
                **config_kwargs: Any) -> NodeProcess:
        data_dir = config_kwargs.pop("data_dir", tmp_path / "var")
        if config_path is None:
            config_path = write_config(tmp_path / "gateway.toml", data_dir, **config_kwargs)
        node = start_node(config_path, tmp_path / "node.log", env)
        node.data_dir = data_dir
        started.append(node)
        return node

    yield factory
    for node in started:
        if node.process.poll() is None:
            try:
                node.stop(timeout=40)
            except subprocess.TimeoutExpired:
                node.kill9()


def node_key_file(data_dir: Path) -> Path:
    """The master key file of the tests' node on *data_dir*: beside it (never inside), made once like an admin would."""
    path = data_dir.parent / "keys" / "master.key"
    if not path.exists():
        create_key_file(path)
    return path


def key_config(data_dir: Path) -> GatewayConfig:
    """A configuration naming *data_dir* and its test key: enough to open what the node sealed."""
    return parse_config({"node": {"data_dir": str(data_dir)},
                         "encryption": {"master_key_file": str(node_key_file(data_dir))}})


def key_ring(folder: Path, key: bytes = bytes(32)) -> KeyRing:
    """A key ring on a fixed master key whose hourly keys live in *folder*."""
    return KeyRing(MasterKey(key), KekFiles(folder), 3600)


def spooled_instances(data_dir: Path) -> list[tuple[str, str]]:
    """Every received instance in the spool, as ``(job_id, file_id)``, read as the gateway reads it."""
    spool = Spool(data_dir)
    return sorted((job_id, file_id) for job_id in spool.job_ids() for file_id in spool.file_ids(job_id))


def spooled_plaintext(data_dir: Path) -> dict[tuple[str, str], bytes]:
    """Every spooled instance, decrypted as the gateway does (master key file in data_dir)."""
    ring = KeyRing.open(key_config(data_dir))
    jobs = JobStore(data_dir / "gateway.db")
    spool = Spool(data_dir)
    try:
        sealer = Sealer(ring, jobs)
        return {(job_id, file_id): sealer.open(job_id, Purpose.RECEIVED, spool.read_instance(job_id, file_id))
                for job_id, file_id in spooled_instances(data_dir)}
    finally:
        jobs.close()


def spooled_by_sop(data_dir: Path) -> dict[str, bytes]:
    """Decrypted spooled instances by SOP Instance UID; fails if one is stored twice."""
    out: dict[str, bytes] = {}
    for raw in spooled_plaintext(data_dir).values():
        uid = str(pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID)
        assert uid not in out, "an instance was stored twice"
        out[uid] = raw
    return out


def dataset_bytes(source: Path | bytes) -> bytes:
    """The encoded data set of a Part 10 file (path or bytes), after its File Meta Information."""
    raw = source.read_bytes() if isinstance(source, Path) else source
    assert raw[128:132] == b"DICM", "not a Part 10 file"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length:]


def group_memory_kib(pgid: int, field: str = "VmRSS") -> dict[int, int]:
    """*field* of ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM`` the peak) of every process in group *pgid*."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        found[int(entry.name)] = next((int(line.split()[1]) for line in status.splitlines()
                                       if line.startswith(f"{field}:")), 0)
    return found


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: TCP_NODELAY, as measured on this machine type."""
    return {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(autouse=True)
def _reset_global_state() -> Iterator[None]:
    """Process-wide settings (umask, pynetdicom, warnings, logging), contextvars and pydicom's validation modes
    back to what they were after each test."""
    settings = ProcessSettings.snapshot()
    reading, writing = pydicom.config.settings.reading_validation_mode, pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.reading_validation_mode = reading
    pydicom.config.settings.writing_validation_mode = writing
    structlog.contextvars.clear_contextvars()
    settings.restore()
