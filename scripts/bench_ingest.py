#!/usr/bin/env python3
"""Ingest benchmark: C-STORE throughput of the gateway node against Orthanc, same machine, same run.

Method
------
* Both receivers run as real processes on loopback with ``TCP_NODELAY=1``: our node
  (``python -m gateway serve``, own process group, temporary ``data_dir``, port 0) and Orthanc
  (generated JSON configuration, temporary storage and index, ``SyncStorageArea`` on so that
  both make every instance durable before answering, no compression, no plugins, C-STORE
  accepted only from the benchmark AE title on 127.0.0.1).
* The sender is dcmtk ``storescu +sd``; its wall time is measured, from process start to the
  exit of the last process, in two configurations: (a) one association carrying every
  instance, (b) ``--parallel`` storescu processes at once, one sub-folder each.
* Every measured run sends a freshly generated series (new Study and SOP Instance UIDs) of
  512x512 int16 CT slices, since both receivers skip duplicates. Generation, and an
  ``os.sync()`` flushing what it wrote, happen before the clock starts.
* Before each run the script waits until neither receiver uses CPU (Orthanc keeps working
  for a while after it answered the last C-STORE; that must not be charged to the next run).
* Runs alternate between the two receivers, and the order flips on every repetition, to
  spread machine noise; the median instances/s per receiver and configuration is reported
  with the ratio gateway / Orthanc. A small unmeasured warm-up store goes to each first.
* After every run the receiver must hold exactly ``--instances`` more instances (spool
  files for the node, ``/statistics`` CountInstances for Orthanc); any loss, storescu
  failure or receiver that does not start ends the script with exit code 1. Missed
  targets do not: this is a measurement, not a test.
* Peak RSS (``VmHWM`` from ``/proc``) is read at the end for every process of the node's
  process group and for Orthanc.
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
TARGETS = {"single": 1.5, "parallel": 1.0}  # minimum ratio gateway / Orthanc


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
    count: Callable[[], int]
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
        "quiet_seconds = 30", "", *key_section(root), "[logging]", 'level = "info"', 'format = "json"', ""]))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    process = stack.enter_context(spawn(command, log_path, REPO))
    started = wait_until(lambda: node_started(log_path), process, "gateway node", log_path)
    spool = data_dir / "spool"
    return Receiver("gateway", "CONTOUR_GW", int(started["port"]),
                    lambda: sum(1 for _ in spool.glob("*/*.dcm")), process, log_path,
                    {"receive_workers": started.get("receive_workers")})


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
    """Send each sub-folder of *folder* at once; verify the receiver gained exactly *count*."""
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


Times = dict[str, dict[str, list[float]]]  # configuration -> receiver -> seconds per run


def measure(storescu: str, receivers: list[Receiver], work: Path, plan: Plan) -> Times:
    """Seconds per run; receivers alternate, and their order flips on every repetition."""
    times: Times = {c: {r.name: [] for r in receivers} for c in TARGETS}
    seed = 0
    for rep in range(plan.repeat):
        order = receivers if rep % 2 == 0 else receivers[::-1]
        for config, parts in (("single", 1), ("parallel", plan.parallel)):
            for receiver in order:
                seed += 1
                seconds = run_one(storescu, receivers, receiver, work, plan, parts, seed)
                times[config][receiver.name].append(seconds)
                print(f"  run {rep + 1}/{plan.repeat} {config:<8} {receiver.name:<8} "
                      f"{seconds:7.2f} s  {plan.instances / seconds:7.1f} inst/s", flush=True)
    return times


# --------------------------------------------------------------------------- report


def summarize(times: Times, plan: Plan, mb_per_instance: float) -> dict[str, Any]:
    """Median instances/s per receiver and the gateway / Orthanc ratio per configuration."""
    out: dict[str, Any] = {}
    for config, by_receiver in times.items():
        entry: dict[str, Any] = {"associations": 1 if config == "single" else plan.parallel,
                                 "target_ratio": TARGETS[config]}
        for name, runs in by_receiver.items():
            rates = [plan.instances / s for s in runs]
            entry[name] = {"seconds": [round(s, 3) for s in runs],
                           "inst_per_s": [round(r, 1) for r in rates],
                           "median_inst_per_s": round(statistics.median(rates), 1),
                           "median_mb_per_s": round(statistics.median(rates) * mb_per_instance, 1)}
        medians = [entry[name]["median_inst_per_s"] for name in ("gateway", "orthanc")]
        entry["ratio"] = round(medians[0] / medians[1], 3)
        entry["target_met"] = entry["ratio"] >= TARGETS[config]
        out[config] = entry
    return out


def print_summary(summary: dict[str, Any], rss: dict[str, Any], plan: Plan, mb: float) -> None:
    print(f"\n{plan.instances} instances of {plan.size}x{plan.size} int16 ({mb:.2f} MB each), "
          f"median of {plan.repeat} runs, {os.cpu_count()} CPUs")
    for config, entry in summary.items():
        print(_summary_line(config, entry))
    per_process = ", ".join(f"{v:.0f}" for v in rss["gateway_mib"])
    print(f"peak RSS: gateway {rss['gateway_total_mib']:.0f} MiB over {len(rss['gateway_mib'])} "
          f"processes ({per_process} MiB), orthanc {rss['orthanc_mib']:.0f} MiB")


def _summary_line(config: str, entry: dict[str, Any]) -> str:
    label = "single association" if config == "single" else f"{entry['associations']} associations"
    gateway, orthanc = entry["gateway"], entry["orthanc"]
    verdict = "met" if entry["target_met"] else "MISSED"
    return (f"{label}: gateway {gateway['median_inst_per_s']:.1f} inst/s, "
            f"orthanc {orthanc['median_inst_per_s']:.1f} inst/s, ratio {entry['ratio']:.2f} "
            f"(target >= {entry['target_ratio']:.1f}, {verdict}; runs gateway "
            f"{min(gateway['inst_per_s']):.0f}-{max(gateway['inst_per_s']):.0f}, "
            f"orthanc {min(orthanc['inst_per_s']):.0f}-{max(orthanc['inst_per_s']):.0f})")


def peak_rss(receivers: list[Receiver]) -> dict[str, Any]:
    """Peak RSS in MiB: each process of the gateway's group, their sum, and Orthanc."""
    by_name = {r.name: group_hwm_kib(r.process.pid) for r in receivers}
    gateway = [v / 1024 for _, v in sorted(by_name["gateway"].items())]
    return {"gateway_mib": [round(v, 1) for v in gateway],
            "gateway_total_mib": round(sum(gateway), 1),
            "orthanc_mib": round(sum(by_name["orthanc"].values()) / 1024, 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration and receiver")
    parser.add_argument("--instances", type=int, default=300, help="instances per run")
    parser.add_argument("--parallel", type=int, default=4, help="storescu processes at once")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured first (0: none)")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the temporary folder goes")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.instances < args.parallel or args.parallel < 1:
        parser.error("need --repeat >= 1 and --instances >= --parallel >= 1")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(args.instances, args.parallel, args.size, args.repeat, args.warmup)
    storescu = dcmtk_tool("storescu")
    with ExitStack() as stack:
        temp = tempfile.TemporaryDirectory(prefix="bench_ingest_", dir=args.tmpdir)
        root = Path(stack.enter_context(temp))
        gateway = start_gateway(stack, root)
        orthanc = start_orthanc(stack, root, {gateway.port})
        receivers = [gateway, orthanc]
        print(f"gateway on port {gateway.port} ({gateway.info}), Orthanc {orthanc.info['version']} "
              f"on port {orthanc.port}; sender {storescu}; work dir {root}", flush=True)
        warm_up(storescu, receivers, root, plan)
        mb = write_series(root / "probe", 1, 1, plan.size, 0) / 1e6
        times = measure(storescu, receivers, root, plan)
        rss = peak_rss(receivers)
    summary = summarize(times, plan, mb)
    print_summary(summary, rss, plan, mb)
    return {"instances": plan.instances, "size": plan.size, "repeat": plan.repeat,
            "parallel": plan.parallel, "mb_per_instance": round(mb, 4), "cpus": os.cpu_count(),
            "gateway": gateway.info, "orthanc": orthanc.info, "results": summary, "peak_rss": rss}


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
