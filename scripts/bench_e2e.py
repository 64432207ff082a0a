#!/usr/bin/env python3
"""End-to-end benchmark: a CT study in by storescu, its RTSTRUCT stored in Orthanc (the TPS), per stage.

Method
------
* CT: the couch phantom of the tests (trunk, arms, lungs, spine, couch, 30 HU noise), by
  default 100 slices of 512 x 512, 3 mm apart, in a 500 mm field. It is generated once and
  written as one series per run, each with new Study, Series and SOP Instance UIDs, before
  any receiver starts; an ``os.sync()`` flushes it.
* Orthanc (``tests.orthanc``: no compression, ``SyncStorageArea`` on, C-STORE admitted only
  from ``CONTOUR_GW`` on 127.0.0.1) is the TPS. The node runs as ``python -m gateway serve``
  in its own process group with a fresh ``data_dir``: one peer (any AE on loopback,
  ``--quiet`` seconds), one route ``Modality = CT`` -> model ``default`` -> Orthanc, every
  other setting at its default (``completion_check_seconds = 1``, one pipeline worker,
  onnxruntime choosing its threads).
* Each run waits until neither process group uses CPU, then sends the series with dcmtk
  ``storescu +sd`` (one association, ``TCP_NODELAY=1``) and polls Orthanc's ``/changes``
  every 50 ms until the RT Structure Set is listed, and the node's log until the job's
  ``job_done``. The runs share the node and Orthanc; the first one also loads the model.

Clocks (all wall clock of this one machine)
-------------------------------------------
* *last received*: the job's ``last_received_at`` as the node recorded it (the start of its
  quiet period) = ``job_done`` timestamp - ``latency_ms``. The storescu exit, taken here,
  is printed beside it as a check.
* *stored*: the start of the first ``/changes`` request that lists the RTSTRUCT, so up to
  one poll (50 ms) late. Orthanc 1.10.1's ``ReceptionDate`` has whole seconds only; the
  node's ``send_succeeded`` (after Orthanc's C-STORE response, which follows the durable
  write) is printed beside it as a check.
* The figure: ``stored - last received - quiet period``, split into the completion timer's
  wait (``job_complete`` - end of the quiet period: up to ``completion_check_seconds``), the
  ``stage_done`` durations of pseudonymise, infer (CT load, model, saving the masks; the
  model alone is ``inference_done``), structure and reidentify, send (send stage start to
  *stored*), and "other" (dispatch and the gaps between stages, plus poll resolution).
* Peak RSS: ``VmHWM`` from ``/proc`` of every process in the node's group (the node, its
  receiver processes), read after the last run; their sum is the node's figure.

The target (issue: <= 10 s with the default model on 2 CPU cores) is compared with the
median run and printed, never asserted; the last line is the figures as JSON. A failed
send, a failed job, or a receiver that does not start ends the script with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_ingest import (  # noqa: E402 - the process helpers of the ingest benchmark
    BenchError,
    bench_env,
    dcmtk_tool,
    group_cpu_ticks,
    group_hwm_kib,
    guarded,
    key_section,
    spawn,
    wait_until,
)

from tests.orthanc import Orthanc, start_orthanc  # noqa: E402
from tests.synthetic import couch_phantom, write_volume_series  # noqa: E402

TARGET_SECONDS = 10.0
FIELD_MM = 500.0  # in-plane field of view: the couch phantom is 460 mm wide
SLICE_MM = 3.0
POLL_SECONDS = 0.05
SCU_AET = "PACS"
NODE_AET = "CONTOUR_GW"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STAGES = ("pseudonymise", "infer", "structure", "reidentify", "send")


@dataclass
class Bench:
    """The running pair under test and what every run needs."""

    storescu: str
    node: subprocess.Popen[bytes]
    node_log: Path
    node_port: int
    orthanc: Orthanc
    quiet_seconds: float
    timeout: float


# --------------------------------------------------------------------------- data


def write_studies(root: Path, runs: int, slices: int, size: int) -> tuple[list[Path], float]:
    """Write the phantom as *runs* studies (fresh UIDs each); return their folders and MB per study."""
    pixel = FIELD_MM / size
    volume, _masks = couch_phantom(0, (slices, size, size), (SLICE_MM, pixel, pixel))
    folders = [write_volume_series(root / f"study{index}", volume).folder for index in range(runs)]
    del volume, _masks
    os.sync()
    megabytes = sum(p.stat().st_size for p in folders[0].iterdir()) / 1e6
    return folders, megabytes


# --------------------------------------------------------------------------- processes


def _orthanc_binary_present() -> bool:
    return Path(shutil.which("Orthanc") or "/usr/sbin/Orthanc").exists()


def write_node_config(root: Path, orthanc: Orthanc, quiet_seconds: float) -> Path:
    """The node's TOML: one peer, Orthanc as the one destination, the default model for CT."""
    path = root / "gateway.toml"
    path.write_text("\n".join([
        "[node]", f'ae_title = "{NODE_AET}"', 'bind = "127.0.0.1"', "port = 0",
        f"data_dir = {json.dumps(str(root / 'gw-data'))}", "",
        "[[peers]]", 'name = "pacs"', 'ae_title = "*"', 'host = "127.0.0.1"', f"quiet_seconds = {quiet_seconds}", "",
        "[[destinations]]", 'name = "tps"', f"ae_title = {json.dumps(orthanc.aet)}", 'host = "127.0.0.1"',
        f"port = {orthanc.dicom_port}", "",
        "[[routes]]", 'name = "default"', 'match = { Modality = "CT" }', 'model = "default"',
        'destinations = ["tps"]', "",
        "[inference]", f"models_dir = {json.dumps(str(REPO / 'models'))}", "", *key_section(root),
        "[logging]", 'level = "info"', 'format = "json"', ""]))
    return path


def read_events(log_path: Path) -> list[dict[str, Any]]:
    """Every JSON object line the node has logged so far."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            events.append(item)
    return events


def _first(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == name), None)


def start_node(stack: ExitStack, root: Path, orthanc: Orthanc, args: argparse.Namespace) -> Bench:
    """Start the node (stopped when *stack* closes); return the bench once it accepts."""
    config, log_path = write_node_config(root, orthanc, args.quiet), root / "gateway.log"
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    node = stack.enter_context(spawn(command, log_path, REPO))
    started = wait_until(lambda: _first(read_events(log_path), "node_started"), node, "gateway node", log_path)
    return Bench(dcmtk_tool("storescu"), node, log_path, int(started["port"]), orthanc, args.quiet, args.timeout)


def settle(pgids: list[int], *, idle_ticks: int = 2, window: float = 0.5, limit: float = 30.0) -> None:
    """Wait until the process groups *pgids* together stop using CPU (start-up, the previous run)."""
    deadline = time.monotonic() + limit
    before = sum(group_cpu_ticks(g) for g in pgids)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sum(group_cpu_ticks(g) for g in pgids)
        if now - before <= idle_ticks:
            return
        before = now


# --------------------------------------------------------------------------- Orthanc


def _rest(orthanc: Orthanc, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}{path}", timeout=10) as reply:
        body: bytes = reply.read()
        return body


def last_change(orthanc: Orthanc) -> int:
    """Orthanc's latest change sequence number."""
    return int(json.loads(_rest(orthanc, "/changes?last"))["Last"])


def new_rtstructs(orthanc: Orthanc, since: int) -> tuple[list[str], int]:
    """Instances stored after change *since* that are RT Structure Sets, and the new change number."""
    changes = json.loads(_rest(orthanc, f"/changes?since={since}&limit=1000"))
    found = [c["ID"] for c in changes["Changes"] if c["ChangeType"] == "NewInstance"
             and _rest(orthanc, f"/instances/{c['ID']}/metadata/SopClassUid").decode() == RTSTRUCT_SOP_CLASS]
    return found, int(changes["Last"])


# --------------------------------------------------------------------------- one run


def send_study(bench: Bench, folder: Path) -> float:
    """Send every file of *folder* over one association; return the wall clock at storescu's exit."""
    args = [bench.storescu, "-aet", SCU_AET, "-aec", NODE_AET, "+sd", "127.0.0.1", str(bench.node_port), str(folder)]
    result = subprocess.run(args, capture_output=True, env=bench_env(), timeout=bench.timeout)
    finished = time.time()
    if result.returncode != 0:
        raise BenchError(f"storescu failed ({result.returncode}):\n"
                         + (result.stdout + result.stderr).decode(errors="replace")[-2000:])
    return finished


def _job_events(bench: Bench, mark: int) -> tuple[str | None, list[dict[str, Any]]]:
    """The job created since event number *mark*, and its events so far."""
    events = read_events(bench.node_log)[mark:]
    jobs = {e["job_id"] for e in events if e.get("event") == "job_created"}
    if len(jobs) > 1:
        raise BenchError(f"one study made {len(jobs)} jobs")
    job_id = next(iter(jobs), None)
    return job_id, [e for e in events if job_id is not None and e.get("job_id") == job_id]


def _check_job(bench: Bench, events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The job's ``job_done`` if logged; fail on an alert, a failed job or a dead node."""
    for event in events:
        if event.get("event") == "alert" or (event.get("event") == "job_done" and event.get("state") != "sent"):
            raise BenchError(f"the job failed: {json.dumps(event)}")
        if event.get("event") == "job_done":
            return event
    if bench.node.poll() is not None:
        raise BenchError(f"the node exited ({bench.node.returncode}):\n"
                         + bench.node_log.read_text(errors="replace")[-3000:])
    return None


def wait_result(bench: Bench, mark: int, since: int) -> tuple[float, list[dict[str, Any]]]:
    """Poll until Orthanc lists the RTSTRUCT and the node logs ``job_done``; return *stored* and the events."""
    deadline, stored = time.monotonic() + bench.timeout, None
    while time.monotonic() < deadline:
        asked = time.time()
        if stored is None:
            found, since = new_rtstructs(bench.orthanc, since)
            stored = asked if found else None
        _job_id, events = _job_events(bench, mark)
        if _check_job(bench, events) is not None and stored is not None:
            return stored, events
        time.sleep(POLL_SECONDS)
    raise BenchError(f"no RTSTRUCT in Orthanc and job_done within {bench.timeout:.0f} s:\n"
                     + bench.node_log.read_text(errors="replace")[-3000:])


def run_once(bench: Bench, folder: Path) -> dict[str, Any]:
    """Send one study after the machine settled; return its figures."""
    if bench.orthanc.process is None:
        raise BenchError("Orthanc is not running")
    settle([bench.node.pid, bench.orthanc.process.pid])
    mark, since = len(read_events(bench.node_log)), last_change(bench.orthanc)
    started = time.time()
    sender_exit = send_study(bench, folder)
    stored, events = wait_result(bench, mark, since)
    return figures(events, stored=stored, sender_exit=sender_exit, started=started, quiet=bench.quiet_seconds)


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def figures(events: list[dict[str, Any]], *, stored: float, sender_exit: float, started: float,
            quiet: float) -> dict[str, Any]:
    """One run's seconds and milliseconds from the job's log events and the two outside clocks."""
    by_name = {e["event"]: e for e in events}  # one task: one event of each kind (the last one wins)
    done, complete = by_name["job_done"], by_name["job_complete"]
    last = _ts(done) - done["latency_ms"] / 1000
    stage_ms = {s: 0 for s in STAGES}
    for e in events:
        if e.get("event") == "stage_done":
            stage_ms[e["stage"]] += int(e["duration_ms"])
    sends = [e for e in events if e.get("event") == "stage_done" and e.get("stage") == "send"]
    send_start = _ts(sends[-1]) - sends[-1]["duration_ms"] / 1000
    e2e_ms = (stored - last - quiet) * 1000
    split = {"completion_wait": (_ts(complete) - last - quiet) * 1000,
             **{s: float(stage_ms[s]) for s in STAGES[:-1]}, "send": (stored - send_start) * 1000}
    split["other"] = e2e_ms - sum(split.values())
    return {"e2e_s": round(e2e_ms / 1000, 3), "split_ms": {k: round(v) for k, v in split.items()},
            "stage_done_ms": stage_ms, "inference_s": by_name["inference_done"]["seconds"],
            "sending_s": round(sender_exit - started, 3),
            "sender_exit_after_last_received_ms": round((sender_exit - last) * 1000),
            "stored_after_send_succeeded_ms": round((stored - _ts(by_name["send_succeeded"])) * 1000),
            "node_latency_ms": done["latency_ms"], "node_processing_ms": done["processing_ms"]}


# --------------------------------------------------------------------------- report


def node_rss(pgid: int) -> dict[str, Any]:
    """Peak RSS (MiB) of each process in the node's group, and their sum."""
    per_process = [kib / 1024 for _pid, kib in sorted(group_hwm_kib(pgid).items())]
    return {"total_mib": round(sum(per_process), 1), "per_process_mib": [round(v, 1) for v in per_process]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs, and the median's ratio to the target."""
    median_e2e = statistics.median(r["e2e_s"] for r in runs)
    split = {k: round(statistics.median(r["split_ms"][k] for r in runs)) for k in runs[0]["split_ms"]}
    return {"e2e_s": round(median_e2e, 3), "split_ms": split,
            "inference_s": round(statistics.median(r["inference_s"] for r in runs), 2),
            "ratio_to_target": round(median_e2e / TARGET_SECONDS, 3), "target_met": median_e2e <= TARGET_SECONDS}


def _split_text(split: dict[str, int]) -> str:
    return ", ".join(f"{name} {ms / 1000:.2f}" for name, ms in split.items())


def print_report(result: dict[str, Any]) -> None:
    print(f"\n{result['slices']} slices of {result['size']}x{result['size']} ({result['study_mb']:.1f} MB), quiet "
          f"period {result['quiet_seconds']:g} s, {result['cpus']} CPUs, Orthanc {result['orthanc_version']}")
    print("seconds from the last instance received to the RTSTRUCT stored in Orthanc, minus the quiet period:")
    for index, run in enumerate(result["runs"], start=1):
        note = " (loads the model)" if index == 1 else ""
        print(f"  run {index}: {run['e2e_s']:6.2f} s = {_split_text(run['split_ms'])}; "
              f"model {run['inference_s']:.2f} s{note}")
        print(f"         checks: storescu {run['sending_s']:.2f} s, exiting "
              f"{run['sender_exit_after_last_received_ms']} ms after the last instance; RTSTRUCT seen "
              f"{run['stored_after_send_succeeded_ms']} ms after send_succeeded")
    median = result["median"]
    verdict = "met" if median["target_met"] else "MISSED"
    print(f"median: {median['e2e_s']:.2f} s = {_split_text(median['split_ms'])}")
    print(f"target <= {TARGET_SECONDS:g} s: ratio {median['ratio_to_target']:.2f}, {verdict}")
    rss = result["node_peak_rss"]
    print(f"node peak RSS: {rss['total_mib']:.0f} MiB over {len(rss['per_process_mib'])} processes "
          f"({', '.join(f'{v:.0f}' for v in rss['per_process_mib'])} MiB)")
    print(json.dumps({"benchmark": "e2e", **result}))


# --------------------------------------------------------------------------- main


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the studies, start Orthanc and the node, run, and collect the figures."""
    if not _orthanc_binary_present():
        raise BenchError("Orthanc not found (apt-get install orthanc)")
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_e2e_", dir=args.tmpdir)))
        print(f"writing {args.runs} studies of {args.slices} x {args.size}^2 under {root} ...", flush=True)
        folders, study_mb = write_studies(root, args.runs, args.slices, args.size)
        orthanc = start_orthanc(root / "orthanc", allowed_aet=NODE_AET)
        stack.callback(orthanc.stop)
        node = start_node(stack, root, orthanc, args)
        print(f"node on port {node.node_port}, Orthanc on {orthanc.dicom_port}", flush=True)
        runs = []
        for index, folder in enumerate(folders, start=1):
            runs.append(run_once(node, folder))
            print(f"  run {index}/{args.runs}: {runs[-1]['e2e_s']:.2f} s", flush=True)
        rss = node_rss(node.node.pid)
        version = json.loads(_rest(orthanc, "/system")).get("Version")
    return {"slices": args.slices, "size": args.size, "study_mb": round(study_mb, 1), "quiet_seconds": args.quiet,
            "cpus": len(os.sched_getaffinity(0)), "orthanc_version": version, "target_s": TARGET_SECONDS,
            "runs": runs, "median": summarize(runs), "node_peak_rss": rss}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="studies sent, one after the other")
    parser.add_argument("--slices", type=int, default=100, help="CT slices per study")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--quiet", type=float, default=2.0, help="the peer's quiet_seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the temporary folder goes")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.slices < 1 or args.size < 64 or args.quiet < 1:
        parser.error("need --runs >= 1, --slices >= 1, --size >= 64 and --quiet >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # tests.orthanc reports a failed start as AssertionError
    code, result = guarded(lambda: bench(args), "node and Orthanc", (BenchError, AssertionError))
    if result is not None:
        print_report(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
