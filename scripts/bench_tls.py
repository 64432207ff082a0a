#!/usr/bin/env python3
"""TLS benchmark: C-STORE ingest rate of the gateway node over DICOM TLS vs plain TCP, same node, same run.

Method
------
* One node (``python -m gateway serve``, own process group, temporary ``data_dir``) listens on
  both a plain port and a DICOM TLS port (mutual authentication, a throw-away PKI from
  ``tests/pki.py``). No routes, and a 600 s quiet period, so no pipeline work runs meanwhile.
* The sender is dcmtk ``storescu +sd`` with ``TCP_NODELAY=1``, the options ``bench_ingest.py``
  uses, plus ``+tls <key> <cert> +cf <ca>`` (dcmtk's default BCP 195 non-downgrading profile)
  for the TLS runs. Its wall time from process start to exit is measured; one association
  carries every instance, so each TLS run pays one handshake.
* Every run sends a freshly generated series (new Study and SOP Instance UIDs), written and
  flushed with ``os.sync()`` before the clock starts; the node's CPU must be idle first.
* Runs alternate between plain and TLS, and the order flips on every repetition; the median
  instances/s per transport and the ratio TLS / plain are reported. A small unmeasured,
  verified warm-up store goes over each transport first.
* After every run the spool must hold exactly ``--instances`` more instances (counted by
  ``gateway.store.spool.count_instances``, whatever the spool layout); any loss, storescu
  failure or node that does not start ends the script with exit code 1. A missed target does
  not: this is a measurement, not a test.
* The TLS version and ciphersuite come from ``storescu -d`` during the (unmeasured) warm-up.
* Peak RSS (``VmHWM`` from ``/proc``) of every process of the node's group is read at the end.

The last line printed is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_ingest import (
    BenchError,
    bench_env,
    dcmtk_tool,
    group_cpu_ticks,
    group_hwm_kib,
    guarded,
    key_section,
    node_started,
    spawn,
    wait_until,
    write_series,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.pki import PKI, make_pki  # noqa: E402 - the PKI the TLS tests use

SCU_AET = "PACS"
NODE_AET = "CONTOUR_GW"
TARGET_RATIO = 0.8  # minimum TLS / plain


# --------------------------------------------------------------------------- node


@dataclass
class Node:
    """The running node under test: its process, ports and spool."""

    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    port: int
    tls_port: int
    info: dict[str, Any]

    def count(self) -> int:
        """Instances in the spool, counted by the node's own code (any spool layout)."""
        from gateway.store.spool import count_instances

        return count_instances(self.data_dir)

    def diagnosis(self) -> str:
        """Whether the node still runs, and the end of its log."""
        code = self.process.poll()
        state = "running" if code is None else f"EXITED with code {code}"
        return f"node is {state}; end of its log:\n{self.log_path.read_text(errors='replace')[-3000:]}"


def start_node(stack: ExitStack, root: Path, pki: PKI) -> Node:
    """Start the node with a plain and a TLS listener on free ports; return it once it accepts."""
    data_dir, config, log_path = root / "var", root / "gateway.toml", root / "gateway.log"
    config.write_text("\n".join([
        "[node]", f'ae_title = "{NODE_AET}"', 'bind = "127.0.0.1"', "port = 0",
        f"data_dir = {json.dumps(str(data_dir))}", "min_free_disk_mb = 0", "max_associations = 8",
        "plain = true", "",
        "[node.tls]", "port = 0",
        f"certificate_file = {json.dumps(str(pki.server.certificate))}",
        f"private_key_file = {json.dumps(str(pki.server.key))}",
        f"ca_file = {json.dumps(str(pki.ca))}", "require_client_certificate = true", "",
        "[[peers]]", 'name = "pacs"', 'ae_title = "*"', 'host = "127.0.0.1"', "quiet_seconds = 600", "",
        *key_section(root),
        # info, not warning: node_started (the ports) is an info event; bench_ingest runs at info too.
        "[logging]", 'level = "info"', 'format = "json"', ""]))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    process = stack.enter_context(spawn(command, log_path, REPO))
    started = wait_until(lambda: node_started(log_path), process, "gateway node", log_path)
    if not started.get("port") or not started.get("tls_port"):
        raise BenchError(f"node did not open both listeners: {started}")
    info = {k: started.get(k) for k in ("version", "receive_workers", "max_associations", "mutual_tls")}
    return Node(process, log_path, data_dir, int(started["port"]), int(started["tls_port"]), info)


def quiesce(node: Node, *, idle_ticks: int = 2, window: float = 0.5, limit: float = 15.0) -> None:
    """Wait until the node's process group stops burning CPU (spool flushes, log writes)."""
    deadline = time.monotonic() + limit
    before = group_cpu_ticks(node.process.pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = group_cpu_ticks(node.process.pid)
        if now - before <= idle_ticks:
            return
        before = now


# --------------------------------------------------------------------------- transports


@dataclass(frozen=True)
class Transport:
    """How storescu reaches the node: a port and the options that go with it."""

    name: str
    port: int
    options: tuple[str, ...]


def transports(node: Node, pki: PKI) -> list[Transport]:
    tls = ("+tls", str(pki.client.key), str(pki.client.certificate), "+cf", str(pki.ca))
    return [Transport("plain", node.port, ()), Transport("tls", node.tls_port, tls)]


def send(storescu: str, node: Node, transport: Transport, folder: Path, *, debug: bool = False) -> tuple[float, str]:
    """One storescu, one association, every file under *folder*; return (seconds, its output); *debug* adds -d."""
    args = [storescu, *transport.options, *(["-d"] if debug else []), "-aet", SCU_AET, "-aec", NODE_AET,
            "+sd", "127.0.0.1", str(transport.port), str(folder)]
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=bench_env())
    try:
        output = process.communicate()[0].decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        raise BenchError(f"storescu over {transport.name} failed ({process.returncode}):\n"
                         f"{output[-2000:]}\n{node.diagnosis()}")
    return elapsed, output


def verified_store(storescu: str, node: Node, transport: Transport, folder: Path, count: int,
                   *, debug: bool = False) -> tuple[float, str]:
    """Send *folder*; fail unless the spool gained exactly *count* instances."""
    before = node.count()
    elapsed, output = send(storescu, node, transport, folder, debug=debug)
    gained = node.count() - before
    if gained != count:
        raise BenchError(f"node LOST INSTANCES over {transport.name}: sent {count}, stored {gained}\n"
                         + node.diagnosis())
    return elapsed, output


def _tls_session(output: str) -> str | None:
    """``Protocol, Ciphersuite`` from the connection details that storescu -d prints."""
    found = dict(re.findall(r"^D:\s+(Protocol|Ciphersuite)\s*:\s*(.+?)\s*$", output, re.MULTILINE))
    return ", ".join(found[k] for k in ("Protocol", "Ciphersuite") if k in found) or None


# --------------------------------------------------------------------------- measurement


@dataclass
class Plan:
    """What to run, from the command line."""

    instances: int
    size: int
    repeat: int
    warmup: int


@dataclass
class Run:
    """One measured store."""

    transport: str
    seconds: float
    bytes: int


def warm_up(storescu: str, node: Node, links: list[Transport], work: Path, plan: Plan) -> dict[str, Any]:
    """Unmeasured, verified small store over each transport; return the TLS session storescu -d reports."""
    info: dict[str, Any] = {}
    for index, transport in enumerate(links):
        folder = work / f"warmup-{transport.name}"
        count = max(plan.warmup, 1)
        write_series(folder, count, 1, plan.size, 10_000 + index)
        _, output = verified_store(storescu, node, transport, folder / "part0", count,
                                    debug=bool(transport.options))
        if transport.options:
            info["tls_session"] = _tls_session(output)
        shutil.rmtree(folder, ignore_errors=True)
    return info


def run_one(storescu: str, node: Node, transport: Transport, work: Path, plan: Plan, seed: int) -> Run:
    """Generate a fresh series, flush it, let the node settle, send it measured."""
    folder = work / f"series-{seed}"
    total = write_series(folder, plan.instances, 1, plan.size, seed)
    os.sync()
    quiesce(node)
    try:
        seconds, _ = verified_store(storescu, node, transport, folder / "part0", plan.instances)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Run(transport.name, seconds, total)


def measure(storescu: str, node: Node, links: list[Transport], work: Path, plan: Plan) -> list[Run]:
    """Every measured run; transports alternate, and their order flips on every repetition."""
    runs: list[Run] = []
    seed = 0
    for rep in range(plan.repeat):
        for transport in links if rep % 2 == 0 else links[::-1]:
            seed += 1
            run = run_one(storescu, node, transport, work, plan, seed)
            runs.append(run)
            print(f"  run {rep + 1}/{plan.repeat} {transport.name:<5} {run.seconds:7.2f} s "
                  f"{plan.instances / run.seconds:7.1f} inst/s {run.bytes / run.seconds / 1e6:7.1f} MB/s", flush=True)
    return runs


# --------------------------------------------------------------------------- report


def summarize(runs: list[Run], plan: Plan) -> dict[str, Any]:
    """Median instances/s and MB/s per transport, and the ratio of medians TLS / plain."""
    out: dict[str, Any] = {}
    for name in ("plain", "tls"):
        mine = [r for r in runs if r.transport == name]
        rates = [plan.instances / r.seconds for r in mine]
        mbps = [r.bytes / r.seconds / 1e6 for r in mine]
        out[name] = {"seconds": [round(r.seconds, 3) for r in mine], "inst_per_s": [round(x, 1) for x in rates],
                     "median_inst_per_s": round(statistics.median(rates), 1),
                     "median_mb_per_s": round(statistics.median(mbps), 1)}
    out["ratio"] = round(out["tls"]["median_inst_per_s"] / out["plain"]["median_inst_per_s"], 3)
    out["target_ratio"] = TARGET_RATIO
    out["target_met"] = out["ratio"] >= TARGET_RATIO
    return out


def peak_rss(node: Node) -> dict[str, Any]:
    """Peak RSS in MiB of each process of the node's group, and their sum."""
    per_process = [v / 1024 for _, v in sorted(group_hwm_kib(node.process.pid).items())]
    return {"node_mib": [round(v, 1) for v in per_process], "node_total_mib": round(sum(per_process), 1)}


def print_summary(results: dict[str, Any], rss: dict[str, Any], plan: Plan, mb: float, tls: dict[str, Any]) -> None:
    plain, secure = results["plain"], results["tls"]
    verdict = "met" if results["target_met"] else "MISSED"
    print(f"\n{plan.instances} instances of {plan.size}x{plan.size} int16 ({mb:.2f} MB each), one association, "
          f"median of {plan.repeat} runs, {os.cpu_count()} CPUs; TLS session: {tls.get('tls_session') or 'unknown'}")
    for name, entry in (("plain", plain), ("TLS", secure)):
        print(f"{name:<5}: {entry['median_inst_per_s']:7.1f} inst/s {entry['median_mb_per_s']:7.1f} MB/s "
              f"(runs {min(entry['inst_per_s']):.0f}-{max(entry['inst_per_s']):.0f} inst/s)")
    print(f"ratio TLS / plain: {results['ratio']:.2f} (target >= {TARGET_RATIO}, {verdict})")
    per_process = ", ".join(f"{v:.0f}" for v in rss["node_mib"])
    print(f"peak RSS: node {rss['node_total_mib']:.0f} MiB over {len(rss['node_mib'])} processes ({per_process} MiB)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="runs per transport")
    parser.add_argument("--instances", type=int, default=300, help="instances per run")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--warmup", type=int, default=20, help="instances of the unmeasured first store")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the temporary folder goes")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.instances < 1 or args.size < 1:
        parser.error("need --repeat >= 1, --instances >= 1 and --size >= 1")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(args.instances, args.size, args.repeat, args.warmup)
    storescu = dcmtk_tool("storescu")
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_tls_", dir=args.tmpdir)))
        pki = make_pki(root / "pki")
        node = start_node(stack, root, pki)
        links = transports(node, pki)
        print(f"node on plain port {node.port} and TLS port {node.tls_port} ({node.info}); "
              f"sender {storescu}; work dir {root}", flush=True)
        tls = warm_up(storescu, node, links, root, plan)
        mb = write_series(root / "probe", 1, 1, plan.size, 0) / 1e6
        runs = measure(storescu, node, links, root, plan)
        rss = peak_rss(node)
    results = summarize(runs, plan)
    print_summary(results, rss, plan, mb, tls)
    return {"bench": "tls", "instances": plan.instances, "size": plan.size, "repeat": plan.repeat,
            "mb_per_instance": round(mb, 4), "cpus": os.cpu_count(), "node": node.info, **tls,
            "plain_inst_per_s": results["plain"]["median_inst_per_s"],
            "plain_mb_per_s": results["plain"]["median_mb_per_s"],
            "tls_inst_per_s": results["tls"]["median_inst_per_s"],
            "tls_mb_per_s": results["tls"]["median_mb_per_s"],
            "ratio": results["ratio"], "target_ratio": TARGET_RATIO, "target_met": results["target_met"],
            "runs": {"plain": results["plain"]["inst_per_s"], "tls": results["tls"]["inst_per_s"]},
            "peak_rss": rss}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, figures = guarded(lambda: bench(args), "node")
    if figures is not None:
        print(json.dumps(figures))
    return code


if __name__ == "__main__":
    sys.exit(main())
