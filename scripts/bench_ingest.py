#!/usr/bin/env python3
"""Ingest benchmark: C-STORE throughput of the gateway node against Orthanc and the sender's own limit, same run.

Method
------
* Three receivers run as real processes on loopback with ``TCP_NODELAY=1``: our node
  (``python -m gateway serve``, own process group, temporary ``data_dir``, port 0, a quiet period of an
  hour so that no study completes and is processed during the benchmark: that is ``bench_e2e.py``'s), Orthanc
  (generated JSON configuration, temporary storage and index, ``SyncStorageArea`` on so that
  both make every instance durable before answering, no compression, no plugins, C-STORE
  accepted only from the benchmark AE title on 127.0.0.1), and the *limit*: dcmtk
  ``storescp --ignore`` (AE title ``LIMIT``, free port, no host lookup, 128 KiB max PDU like
  the node's default), which receives every instance and stores nothing, so its rate is what
  the sender itself allows on this machine. It counts as started once its port accepts a
  TCP connection.
* The sender is dcmtk ``storescu +sd``; its wall time is measured, from process start to the
  exit of the last process, in two configurations: (a) one association carrying every
  instance, (b) ``--parallel`` storescu processes at once, one sub-folder each.
* Every measured run sends a freshly generated series (new Study and SOP Instance UIDs) of
  512x512 int16 CT slices, since the receivers skip duplicates. Generation, and an
  ``os.sync()`` flushing what it wrote, happen before the clock starts.
* Before each run the script waits until no receiver uses CPU (Orthanc keeps working
  for a while after it answered the last C-STORE; that must not be charged to the next run).
* Runs alternate between the three receivers, and the order flips on every repetition, to
  spread machine noise; the median instances/s per receiver and configuration is reported
  with the ratio gateway / Orthanc (targets: ``TARGETS``) and the fraction gateway / limit
  (target ``LIMIT_TARGET`` on one association). A small unmeasured warm-up store goes to each
  first.
* After every run the node and Orthanc must hold exactly ``--instances`` more instances
  (``gateway.store.spool.count_instances`` for the node, ``/statistics`` CountInstances for
  Orthanc); ``storescp --ignore`` keeps nothing to count, so only its storescu exit status is
  checked. Any loss, storescu failure or receiver that does not start ends the script with
  exit code 1. Missed targets do not: this is a measurement, not a test.
* The disk's own limit, measured in the same rotation (once per repetition, machine settled first):
  the same number of records of one instance's size written the way the node makes an instance durable,
  and nothing else: ``pwrite`` into space pre-allocated with ``posix_fallocate``, then ``fdatasync``, one
  record at a time, in this process, in the work folder (the file system of every receiver's storage).
  On one association the next C-STORE waits for the answer to the last, and a receiver that answers only
  once the instance is durable cannot overlap the two, so no such receiver exceeds the *serial bound*
  ``1 / (1 / limit + 1 / disk)``; it is printed with the gateway's fraction of it.
* Flushes per instance: after the measured runs, one more, unmeasured store per receiver of
  a fresh series (``--flush-instances``, one association) with ``strace -f -c`` attached to
  every process of the receiver's process group, counting ``fsync``, ``fdatasync``,
  ``sync_file_range``, ``msync``, ``syncfs`` and ``sync`` from attach to storescu's exit;
  calls per instance are reported by syscall and in total. Without strace, or where ptrace
  is not permitted, the script says so and carries on.
* Peak RSS (``VmHWM`` from ``/proc``) is read at the end for every process of the node's
  process group, for Orthanc and for storescp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.synthetic import ct_slice  # noqa: E402 - the same CT the tests use

SCU_AET = "BENCHSCU"
TARGETS = {"single": 1.5, "parallel": 1.2}  # minimum ratio gateway / Orthanc
LIMIT_TARGET = 0.5  # minimum fraction gateway / storescp --ignore, one association
LIMIT_AET = "LIMIT"
LIMIT_MAX_PDU = 131_072  # storescp's default is 16 KiB; the node offers 128 KiB (gateway.config max_pdu_size)
FLUSH_SYSCALLS = ("fsync", "fdatasync", "sync_file_range", "msync", "syncfs", "sync")


class BenchError(RuntimeError):
    """A failure that invalidates the measurement: lost instance, failed start, failed send."""


# --------------------------------------------------------------------------- data


def write_series(folder: Path, count: int, parts: int, size: int, seed: int) -> int:
    """Write *count* CT slices of a fresh study into *parts* sub-folders; return total bytes."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    total = 0
    for index in range(count):
        sub = folder / f"part{index % parts}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"slice{index:04d}.dcm"
        ct_slice(study_uid, series_uid, frame_uid, index, size, rng).save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


# --------------------------------------------------------------------------- processes


def free_port(taken: set[int] | None = None) -> int:
    """Return a loopback TCP port that was free a moment ago and is not in *taken*."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in (taken or set()):
            return port


def dcmtk_tool(name: str) -> str:
    """Path of a dcmtk tool; the venv's pynetdicom ships same-named scripts, so check."""
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and Path(candidate).exists():
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if "dcmtk" in out.lower():
                return candidate
    raise BenchError(f"dcmtk {name} not found (apt-get install dcmtk)")


def bench_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1"}


def stop_group(process: subprocess.Popen[bytes], timeout: float = 40.0) -> None:
    """SIGTERM the leader, wait, then SIGKILL its whole process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@contextmanager
def spawn(args: list[str], log_path: Path, cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run *args* in its own session with output to *log_path*; stop it on exit."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env=bench_env(), start_new_session=True)
    try:
        yield process
    finally:
        stop_group(process)


def wait_until(check: Callable[[], Any], process: subprocess.Popen[bytes], what: str,
               log_path: Path, timeout: float = 60.0) -> Any:
    """Poll *check* until it returns a truthy value; fail if *process* dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if process.poll() is not None:
            raise BenchError(f"{what} exited ({process.returncode}) before it was ready:\n"
                             + log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.1)
    raise BenchError(f"{what} not ready within {timeout:.0f} s:\n"
                     + log_path.read_text(errors="replace")[-3000:])


def _group_members(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """``(/proc/PID, fields of its stat after the command name)`` for each process of group *pgid*."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                yield entry, fields
        except (OSError, IndexError, ValueError):
            continue


def group_hwm_kib(pgid: int) -> dict[int, int]:
    """``VmHWM`` (KiB) of every live process in process group *pgid*, by pid."""
    out = {}
    for entry, _fields in _group_members(pgid):
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[int(entry.name)] = int(line.split()[1])
        except (OSError, ValueError):
            continue
    return out


def group_cpu_ticks(pgid: int) -> int:
    """User + system clock ticks used so far by process group *pgid*."""
    return sum(int(fields[11]) + int(fields[12]) for _entry, fields in _group_members(pgid))


def quiesce(receivers: list[Receiver], *, idle_ticks: int = 2, window: float = 0.5, limit: float = 15.0) -> None:
    """Wait until no receiver burns CPU (Orthanc, for one, keeps working after it answered).

    Otherwise one receiver's background work after its run is charged to the next run of
    the other.
    """
    deadline = time.monotonic() + limit
    before = sum(group_cpu_ticks(r.process.pid) for r in receivers)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sum(group_cpu_ticks(r.process.pid) for r in receivers)
        if now - before <= idle_ticks:
            return
        before = now


# --------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    """A running C-STORE receiver under test."""

    name: str
    ae_title: str
    port: int
    count: Callable[[], int] | None  # instances held; None: keeps nothing to count (storescp --ignore)
    process: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    def diagnosis(self) -> str:
        """Whether the receiver still runs, and the end of its log."""
        code = self.process.poll()
        state = "running" if code is None else f"EXITED with code {code}"
        tail = self.log_path.read_text(errors="replace")[-3000:]
        return f"{self.name} is {state}; end of its log:\n{tail}"


def node_started(log_path: Path) -> dict[str, Any] | None:
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and item.get("event") == "node_started":
            return item
    return None


def key_section(root: Path) -> list[str]:
    """TOML lines naming a master key made for this run under *root* (outside its data_dir)."""
    from gateway.store.keys import create_key_file

    key_file = root / "keys" / "master.key"
    if not key_file.exists():
        create_key_file(key_file)
    return ["[encryption]", f"master_key_file = {json.dumps(str(key_file))}", ""]


def start_gateway(stack: ExitStack, root: Path) -> Receiver:
    """Start the node on a free port with a fresh data_dir; return it once it accepts."""
    data_dir, config, log_path = root / "gw-data", root / "gateway.toml", root / "gateway.log"
    config.write_text("\n".join([
        "[node]", 'ae_title = "CONTOUR_GW"', 'bind = "127.0.0.1"', "port = 0",
        f"data_dir = {json.dumps(str(data_dir))}", "max_associations = 8", "",
        "[[peers]]", 'name = "bench"', 'ae_title = "*"', 'host = "127.0.0.1"',
        "quiet_seconds = 3600", "", *key_section(root), "[logging]", 'level = "info"', 'format = "json"', ""]))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    process = stack.enter_context(spawn(command, log_path, REPO))
    started = wait_until(lambda: node_started(log_path), process, "gateway node", log_path)
    return Receiver("gateway", "CONTOUR_GW", int(started["port"]), lambda: spool_count(data_dir),
                    process, log_path, {"receive_workers": started.get("receive_workers")})


def spool_count(data_dir: Path) -> int:
    """Instances the node's spool under *data_dir* holds, counted by the node's own code (any layout)."""
    from gateway.store.spool import count_instances

    return count_instances(data_dir)


def _orthanc_get(http_port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as reply:
        return json.loads(reply.read())


def _orthanc_ready(http_port: int) -> bool:
    try:
        return bool(_orthanc_get(http_port, "/system"))
    except OSError:
        return False


def start_orthanc(stack: ExitStack, root: Path, taken: set[int]) -> Receiver:
    """Start Orthanc with a generated configuration; return it once its REST API answers."""
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        raise BenchError("Orthanc not found (apt-get install orthanc)")
    dicom_port = free_port(taken)
    http_port = free_port(taken | {dicom_port})
    config, log_path = root / "orthanc.json", root / "orthanc.log"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(root / "orthanc-storage"),
        "IndexDirectory": str(root / "orthanc-index"), "DicomAet": "ORTHANC",
        "DicomPort": dicom_port, "HttpPort": http_port, "SyncStorageArea": True,
        "DicomCheckCalledAet": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageCompression": False, "Plugins": [], "SaveJobs": False,
        # Orthanc 1.10 cannot bind to loopback only: accept C-STORE from one AE on 127.0.0.1.
        "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
        "DicomModalities": {"bench": [SCU_AET, "127.0.0.1", 104]},
    }, indent=2))
    process = stack.enter_context(spawn([binary, str(config)], log_path, root))
    wait_until(lambda: _orthanc_ready(http_port), process, "Orthanc", log_path)
    version = _orthanc_get(http_port, "/system").get("Version")
    return Receiver("orthanc", "ORTHANC", dicom_port,
                    lambda: int(_orthanc_get(http_port, "/statistics")["CountInstances"]),
                    process, log_path, {"version": version})


def _port_open(port: int) -> bool:
    """Whether something accepts a TCP connection on loopback *port*."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_limit(stack: ExitStack, root: Path, taken: set[int]) -> Receiver:
    """Start dcmtk ``storescp --ignore`` (receives, stores nothing); return it once its port accepts."""
    binary = dcmtk_tool("storescp")
    if "--ignore" not in subprocess.run([binary, "--help"], capture_output=True, text=True).stdout:
        raise BenchError(f"{binary} has no --ignore option (dcmtk too old)")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    port, log_path = free_port(taken), root / "storescp.log"
    command = [binary, "--ignore", "--disable-host-lookup", "--aetitle", LIMIT_AET,
               "--max-pdu", str(LIMIT_MAX_PDU), str(port)]
    process = stack.enter_context(spawn(command, log_path, root))
    wait_until(lambda: _port_open(port), process, "storescp", log_path)
    return Receiver("storescp", LIMIT_AET, port, None, process, log_path,
                    {"version": version.splitlines()[0].strip("$ ") if version else None,
                     "max_pdu": LIMIT_MAX_PDU})


# --------------------------------------------------------------------------- measurement


def send(storescu: str, receiver: Receiver, folders: list[Path]) -> float:
    """Run one storescu per folder at once; return the wall time until the last one exits."""
    args = [[storescu, "-aet", SCU_AET, "-aec", receiver.ae_title, "+sd", "127.0.0.1",
             str(receiver.port), str(folder)] for folder in folders]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        start = time.perf_counter()
        processes = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=bench_env()) for a in args]
        outputs = [p.communicate()[0] for p in processes]
        elapsed = time.perf_counter() - start
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(processes, outputs, strict=True):
        if p.returncode != 0:
            raise BenchError(f"storescu to {receiver.name} failed ({p.returncode}):\n"
                             + out.decode(errors="replace")[-2000:] + "\n" + receiver.diagnosis())
    return elapsed


def measured_store(storescu: str, receiver: Receiver, folder: Path, count: int) -> float:
    """Send each sub-folder of *folder* at once; verify the receiver gained exactly *count* (if it keeps any)."""
    if receiver.count is None:  # storescp --ignore: only storescu's exit status (checked by send) tells
        return send(storescu, receiver, sorted(folder.iterdir()))
    before = receiver.count()
    elapsed = send(storescu, receiver, sorted(folder.iterdir()))
    gained = receiver.count() - before
    if gained != count:
        raise BenchError(f"{receiver.name} LOST INSTANCES: sent {count}, stored {gained}\n"
                         + receiver.diagnosis())
    return elapsed


@dataclass
class Plan:
    """What to run, from the command line."""

    instances: int
    parallel: int
    size: int
    repeat: int
    warmup: int
    flush: int  # instances of the strace'd store per receiver (0: none)


def run_one(storescu: str, receivers: list[Receiver], receiver: Receiver, work: Path, plan: Plan,
            parts: int, seed: int) -> float:
    """Generate a fresh series, flush it, let the machine settle, send it measured; return seconds."""
    folder = work / f"series-{seed}"
    write_series(folder, plan.instances, parts, plan.size, seed)
    os.sync()
    quiesce(receivers)
    try:
        return measured_store(storescu, receiver, folder, plan.instances)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def warm_up(storescu: str, receivers: list[Receiver], work: Path, plan: Plan) -> None:
    """Unmeasured small store to each receiver (imports, caches, first job), still verified."""
    if plan.warmup <= 0:
        return
    for index, receiver in enumerate(receivers):
        folder = work / f"warmup-{index}"
        write_series(folder, plan.warmup, 1, plan.size, 10_000 + index)
        measured_store(storescu, receiver, folder, plan.warmup)
        shutil.rmtree(folder, ignore_errors=True)


Times = dict[str, dict[str, list[float]]]  # configuration -> receiver (or "disk") -> seconds per run


def disk_store(folder: Path, count: int, record_bytes: int) -> float:
    """Seconds to make *count* records of *record_bytes* durable one by one as the node does, and nothing else:
    ``pwrite`` into pre-allocated space, then ``fdatasync`` (see the module docstring)."""
    record = os.urandom(record_bytes)
    stride = -(-record_bytes // 4096) * 4096
    path = folder / "disk-limit.seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, count * stride)
        os.fsync(fd)
        start = time.perf_counter()
        for index in range(count):
            os.pwrite(fd, record, index * stride)
            os.fdatasync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()


def measure(storescu: str, receivers: list[Receiver], work: Path, plan: Plan, record_bytes: int) -> Times:
    """Seconds per run; receivers alternate, and their order flips on every repetition; the disk once each."""
    times: Times = {c: {r.name: [] for r in receivers} for c in TARGETS}
    times["single"]["disk"] = []
    seed = 0
    for rep in range(plan.repeat):
        quiesce(receivers)
        seconds = disk_store(work, plan.instances, record_bytes)
        times["single"]["disk"].append(seconds)
        print(f"  run {rep + 1}/{plan.repeat} {'single':<8} {'disk':<8} "
              f"{seconds:7.2f} s  {plan.instances / seconds:7.1f} inst/s", flush=True)
        order = receivers if rep % 2 == 0 else receivers[::-1]
        for config, parts in (("single", 1), ("parallel", plan.parallel)):
            for receiver in order:
                seed += 1
                seconds = run_one(storescu, receivers, receiver, work, plan, parts, seed)
                times[config][receiver.name].append(seconds)
                print(f"  run {rep + 1}/{plan.repeat} {config:<8} {receiver.name:<8} "
                      f"{seconds:7.2f} s  {plan.instances / seconds:7.1f} inst/s", flush=True)
    return times


# --------------------------------------------------------------------------- flushes


class NoTrace(Exception):
    """strace is missing or cannot attach (ptrace not permitted): flushes cannot be counted."""


def attach_strace(pgid: int, out: Path) -> subprocess.Popen[bytes]:
    """Start ``strace -f -c`` on every process of group *pgid*, counting flush syscalls into *out*.

    Returns once strace reports every process attached; raises NoTrace if it cannot.
    """
    binary = shutil.which("strace")
    pids = sorted(int(entry.name) for entry, _fields in _group_members(pgid))
    if binary is None or not pids:
        raise NoTrace("strace not found (apt-get install strace)" if binary is None else "no process to trace")
    log_path = out.with_suffix(".log")
    args = [binary, "-f", "-c", "-o", str(out), "-e", f"trace={','.join(FLUSH_SYSCALLS)}",
            *(arg for pid in pids for arg in ("-p", str(pid)))]
    with log_path.open("wb") as log:
        tracer = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and tracer.poll() is None:
        text = log_path.read_text(errors="replace")
        if all(f"Process {pid} attached" in text for pid in pids):
            return tracer
        if "attach: ptrace" in text:
            break
        time.sleep(0.05)
    stop_strace(tracer)
    raise NoTrace(log_path.read_text(errors="replace").strip()[-500:] or "strace did not attach")


def stop_strace(tracer: subprocess.Popen[bytes]) -> None:
    """SIGINT strace (it detaches and writes its summary) and wait for it; SIGKILL if it hangs."""
    if tracer.poll() is None:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()


def parse_strace_counts(text: str) -> dict[str, int]:
    """Calls by syscall from the table ``strace -c`` writes (a syscall not listed was not called)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()  # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[-1] in FLUSH_SYSCALLS:
            counts[fields[-1]] = int(fields[3])
    return counts


def count_flushes(storescu: str, receivers: list[Receiver], receiver: Receiver, work: Path, plan: Plan,
                  seed: int) -> dict[str, Any]:
    """Flush syscalls per instance while *receiver* takes a fresh series over one association (unmeasured)."""
    folder, out = work / f"flush-{receiver.name}", work / f"strace-{receiver.name}.txt"
    write_series(folder, plan.flush, 1, plan.size, seed)
    os.sync()
    quiesce(receivers)
    try:
        tracer = attach_strace(receiver.process.pid, out)
        try:
            measured_store(storescu, receiver, folder, plan.flush)
        finally:
            stop_strace(tracer)
    except NoTrace as exc:
        return {"counted": False, "reason": str(exc)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    calls = parse_strace_counts(out.read_text(errors="replace") if out.exists() else "")
    return {"counted": True, "instances": plan.flush,
            "per_instance": {name: round(calls.get(name, 0) / plan.flush, 3) for name in FLUSH_SYSCALLS},
            "total_per_instance": round(sum(calls.values()) / plan.flush, 3)}


def flushes_per_instance(storescu: str, receivers: list[Receiver], work: Path, plan: Plan) -> dict[str, Any]:
    """``count_flushes`` for every receiver in turn (none with ``--flush-instances 0``)."""
    if plan.flush <= 0:
        return {}
    return {r.name: count_flushes(storescu, receivers, r, work, plan, 20_000 + i) for i, r in enumerate(receivers)}


# --------------------------------------------------------------------------- report

LABELS = {"gateway": "gateway", "orthanc": "orthanc", "storescp": "storescp --ignore (limit)"}


def _rates(runs: list[float], plan: Plan, mb_per_instance: float) -> dict[str, Any]:
    """Seconds, instances/s per run, and their medians, of one receiver in one configuration."""
    rates = [plan.instances / s for s in runs]
    return {"seconds": [round(s, 3) for s in runs], "inst_per_s": [round(r, 1) for r in rates],
            "median_inst_per_s": round(statistics.median(rates), 1),
            "median_mb_per_s": round(statistics.median(rates) * mb_per_instance, 1)}


def summarize(times: Times, plan: Plan, mb_per_instance: float) -> dict[str, Any]:
    """Median instances/s per receiver, gateway / Orthanc and gateway / limit, per configuration."""
    out: dict[str, Any] = {}
    for config, by_receiver in times.items():
        entry: dict[str, Any] = {"associations": 1 if config == "single" else plan.parallel,
                                 "target_ratio": TARGETS[config]}
        entry |= {name: _rates(runs, plan, mb_per_instance) for name, runs in by_receiver.items()}
        gateway = entry["gateway"]["median_inst_per_s"]
        entry["ratio"] = round(gateway / entry["orthanc"]["median_inst_per_s"], 3)
        entry["target_met"] = entry["ratio"] >= TARGETS[config]
        entry["limit_fraction"] = round(gateway / entry["storescp"]["median_inst_per_s"], 3)
        if config == "single":
            entry["limit_target"] = LIMIT_TARGET
            entry["limit_target_met"] = entry["limit_fraction"] >= LIMIT_TARGET
            bound = 1 / (1 / entry["storescp"]["median_inst_per_s"] + 1 / entry["disk"]["median_inst_per_s"])
            entry["serial_bound_inst_per_s"] = round(bound, 1)
            entry["serial_bound_fraction"] = round(gateway / bound, 3)
        out[config] = entry
    return out


def print_summary(summary: dict[str, Any], flushes: dict[str, Any], rss: dict[str, Any], plan: Plan,
                  mb: float) -> None:
    print(f"\n{plan.instances} instances of {plan.size}x{plan.size} int16 ({mb:.2f} MB each), "
          f"median of {plan.repeat} runs, {os.cpu_count()} CPUs")
    for config, entry in summary.items():
        print("\n".join(_summary_lines(config, entry)))
    for line in _flush_lines(flushes):
        print(line)
    per_process = ", ".join(f"{v:.0f}" for v in rss["gateway_mib"])
    print(f"peak RSS: gateway {rss['gateway_total_mib']:.0f} MiB over {len(rss['gateway_mib'])} "
          f"processes ({per_process} MiB), orthanc {rss['orthanc_mib']:.0f} MiB, "
          f"storescp {rss['storescp_mib']:.0f} MiB")


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _summary_lines(config: str, entry: dict[str, Any]) -> list[str]:
    """Rates of each receiver, then the ratio to Orthanc and the fraction of the limit, with targets."""
    label = "single association" if config == "single" else f"{entry['associations']} associations"
    rates = ", ".join(f"{LABELS[name]} {entry[name]['median_inst_per_s']:.1f} inst/s "
                      f"(runs {min(entry[name]['inst_per_s']):.0f}-{max(entry[name]['inst_per_s']):.0f})"
                      for name in LABELS)
    limit = f"gateway / limit {entry['limit_fraction']:.2f}"
    if "limit_target" in entry:
        limit += f" (target >= {entry['limit_target']:.1f}, {_verdict(entry['limit_target_met'])})"
    lines = [f"{label}: {rates}",
             f"  gateway / orthanc {entry['ratio']:.2f} (target >= {entry['target_ratio']:.1f}, "
             f"{_verdict(entry['target_met'])}); {limit}"]
    if "serial_bound_inst_per_s" in entry:
        disk, bound = entry["disk"], entry["serial_bound_inst_per_s"]
        lines.append(f"  disk alone (pwrite + fdatasync per instance) {disk['median_inst_per_s']:.1f} inst/s "
                     f"(runs {min(disk['inst_per_s']):.0f}-{max(disk['inst_per_s']):.0f}); serial bound "
                     f"1 / (1/limit + 1/disk) {bound:.1f} inst/s, gateway / bound "
                     f"{entry['serial_bound_fraction']:.2f}")
        if entry["limit_target"] * entry["storescp"]["median_inst_per_s"] > bound:
            lines.append(f"  (the limit target, {entry['limit_target']:.1f} x limit, is above the serial bound here: "
                         "no receiver that answers after a flush can reach it)")
    return lines


def _flush_lines(flushes: dict[str, Any]) -> list[str]:
    """Flush syscalls per instance of each receiver, or why they could not be counted."""
    if not flushes:
        return ["flushes per instance: not counted (--flush-instances 0)"]
    counted = [f for f in flushes.values() if f["counted"]]
    lines = [f"flushes per instance (strace -f -c, unmeasured store of {counted[0]['instances']} instances, "
             "one association):" if counted else "flushes per instance:"]
    for name, found in flushes.items():
        if not found["counted"]:
            lines.append(f"  {name:<8} flushes could not be counted: {found['reason']}")
            continue
        calls = ", ".join(f"{k} {v:.2f}" for k, v in found["per_instance"].items() if v)
        lines.append(f"  {name:<8} total {found['total_per_instance']:.2f}" + (f" ({calls})" if calls else ""))
    return lines


def peak_rss(receivers: list[Receiver]) -> dict[str, Any]:
    """Peak RSS in MiB: each process of the gateway's group, their sum, Orthanc and storescp."""
    by_name = {r.name: group_hwm_kib(r.process.pid) for r in receivers}
    gateway = [v / 1024 for _, v in sorted(by_name["gateway"].items())]
    return {"gateway_mib": [round(v, 1) for v in gateway],
            "gateway_total_mib": round(sum(gateway), 1),
            "orthanc_mib": round(sum(by_name["orthanc"].values()) / 1024, 1),
            "storescp_mib": round(sum(by_name["storescp"].values()) / 1024, 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration and receiver")
    parser.add_argument("--instances", type=int, default=300, help="instances per run")
    parser.add_argument("--parallel", type=int, default=4, help="storescu processes at once")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured first (0: none)")
    parser.add_argument("--flush-instances", type=int, default=100,
                        help="instances of the unmeasured store per receiver under strace (0: no flush count)")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the temporary folder goes")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.instances < args.parallel or args.parallel < 1 or args.flush_instances < 0:
        parser.error("need --repeat >= 1, --instances >= --parallel >= 1 and --flush-instances >= 0")
    return args


def start_receivers(stack: ExitStack, root: Path) -> list[Receiver]:
    """The node, Orthanc and storescp --ignore, each on its own free port, in that order."""
    gateway = start_gateway(stack, root)
    orthanc = start_orthanc(stack, root, {gateway.port})
    limit = start_limit(stack, root, {gateway.port, orthanc.port})
    return [gateway, orthanc, limit]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(args.instances, args.parallel, args.size, args.repeat, args.warmup, args.flush_instances)
    storescu = dcmtk_tool("storescu")
    with ExitStack() as stack:
        temp = tempfile.TemporaryDirectory(prefix="bench_ingest_", dir=args.tmpdir)
        root = Path(stack.enter_context(temp))
        receivers = start_receivers(stack, root)
        gateway, orthanc, limit = receivers
        print(f"gateway on port {gateway.port} ({gateway.info}), Orthanc {orthanc.info['version']} "
              f"on port {orthanc.port}, {limit.info['version']} --ignore on port {limit.port}; "
              f"sender {storescu}; work dir {root}", flush=True)
        warm_up(storescu, receivers, root, plan)
        record_bytes = write_series(root / "probe", 1, 1, plan.size, 0)
        mb = record_bytes / 1e6
        times = measure(storescu, receivers, root, plan, record_bytes)
        flushes = flushes_per_instance(storescu, receivers, root, plan)
        rss = peak_rss(receivers)
    summary = summarize(times, plan, mb)
    print_summary(summary, flushes, rss, plan, mb)
    return {"instances": plan.instances, "size": plan.size, "repeat": plan.repeat,
            "parallel": plan.parallel, "mb_per_instance": round(mb, 4), "cpus": os.cpu_count(),
            "gateway": gateway.info, "orthanc": orthanc.info, "storescp": limit.info, "results": summary,
            "limit_target": LIMIT_TARGET, "flushes_per_instance": flushes, "peak_rss": rss}


def raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def guarded(run: Callable[[], dict[str, Any]], stopped: str,
            failures: tuple[type[Exception], ...] = (BenchError,)) -> tuple[int, dict[str, Any] | None]:
    """Run a benchmark with SIGTERM handled like Ctrl-C; return its exit code and figures."""
    signal.signal(signal.SIGTERM, raise_interrupt)  # clean up on SIGTERM as on Ctrl-C
    try:
        return 0, run()
    except failures as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"\ninterrupted; {stopped} stopped, temporary files removed", file=sys.stderr)
        return 130, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, figures = guarded(lambda: bench(args), "receivers")
    if figures is None:
        return code
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
