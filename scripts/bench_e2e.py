#!/usr/bin/env python3
"""End-to-end benchmark: CT studies in by storescu, their RTSTRUCT stored in Orthanc (the TPS), per stage.

Method
------
* CTs (``--ct``, default ``all``: each of the four below, in one session of the node and Orthanc):

  - ``phantom``: the couch phantom of the tests (trunk, arms, lungs, spine, couch, 30 HU noise), by
    default 100 slices of 512 x 512, 3 mm apart, in a 500 mm field; kept for comparison.
  - ``lung1``, ``lung2``: the real chest CTs of ``tests.realct`` (pyradiomics 3.1.0's
    ``lung1_image.nrrd`` / ``lung2_image.nrrd`` through ``plastimatch convert``, fetched and converted
    once per machine and cached under ``tests.realct.cache_dir()``): 512 x 512 at 0.57 / 0.63 mm, 48 /
    61 slices of 5 mm, headers and pixels as plastimatch wrote them (DERIVED\\SECONDARY\\AXIAL).
  - ``lung100``: a real chest CT of 100 slices, on which the targets are judged. No real chest CT of
    100 slices is at hand and two patients must not be stacked into one, so it is ``lung2`` (61
    slices of 5 mm, 300 mm from the first slice to the last) re-sliced: 100 slices over the same z
    extent, 300 / 99 = 3.03 mm apart, each linearly interpolated along z between its two neighbouring
    real slices (the in-plane grid and every real HU in plane untouched); Image Position (Patient),
    Slice Location and Slice Thickness state the new spacing. No anatomy is invented, but the
    interpolated slices are smoother along z than a scanner's 3 mm slices would be.

  Every study is written before any receiver starts, each run as its own series with new Study,
  Series, SOP Instance and Frame of Reference UIDs and the canary patient of the tests; an
  ``os.sync()`` flushes them.
* Orthanc (``tests.orthanc``: no compression, ``SyncStorageArea`` on, C-STORE admitted only
  from ``CONTOUR_GW`` on 127.0.0.1) is the TPS. The node runs as ``python -m gateway serve``
  in its own process group with a fresh ``data_dir``: one peer (any AE on loopback,
  ``--quiet`` seconds), one route ``Modality = CT`` -> model ``default`` -> Orthanc, every
  other setting at its default (``completion_check_seconds = 1``, one pipeline worker,
  onnxruntime choosing its threads).
* The node loads the model on its first job, so ``--warmup`` studies (default 1, of the first CT
  kind) go first and are reported but left out of the medians. Then ``--runs`` rounds, each
  sending every chosen CT kind once, in the order phantom, lung1, lung2, lung100 (interleaved, so
  a drift of the machine spreads over every kind).
* Each run waits until neither process group uses CPU, then sends the series with dcmtk
  ``storescu +sd`` (one association, ``TCP_NODELAY=1``) and polls Orthanc's ``/changes``
  every 50 ms until the RT Structure Set is listed, and the node's log until the job's
  ``job_done``. The runs share the node and Orthanc.

Clocks (all wall clock of this one machine)
-------------------------------------------
* *last received*: the job's ``last_received_at`` as the node recorded it (the start of its
  quiet period) = ``job_done`` timestamp - ``latency_ms``. The storescu exit, taken here,
  is printed beside it as a check.
* *stored*: the start of the first ``/changes`` request that lists the RTSTRUCT, so up to
  one poll (50 ms) late. Orthanc 1.10.1's ``ReceptionDate`` has whole seconds only; the
  node's ``send_succeeded`` (after Orthanc's C-STORE response, which follows the durable
  write) is printed beside it as a check.
* The total: ``stored - last received - quiet period``, split into the completion timer's
  wait (``job_complete`` - end of the quiet period: up to ``completion_check_seconds``), the
  ``stage_done`` durations of pseudonymise, infer (CT load, model, saving the masks; the
  model alone is ``inference_done``), structure and reidentify, send (send stage start to
  *stored*), and "other" (dispatch and the gaps between stages, plus poll resolution).
* Processing: the node's own ``processing_ms`` of ``job_done`` (``job_complete`` to ``job_done``:
  every stage and the gaps, send included); the sum of the four stages before send is printed
  beside it.
* Peak RSS: ``VmHWM`` from ``/proc`` of every process in the node's group (the node, its
  receiver processes), summed. It is read once before the first run (start-up) and after every
  run; after each reading the peaks are reset (``/proc/PID/clear_refs`` ``5``), so each run has
  its own figure and each CT kind the largest of its runs. The session's figure sums each
  process's largest reading. Where the reset is refused, only the session's figure is given.

The issue's bar (<= 10 s from the last instance to the RTSTRUCT stored, quiet period excluded,
512 x 512 x 100) and its target (<= 6 s processing with the default model on 2 CPU cores, peak
RSS <= 1.5 GiB) are judged on the median ``lung100`` run and printed as met or MISSED, never
asserted; the last line is all figures, per CT kind, as JSON. A failed send, a failed job, a
real CT that cannot be obtained, or a receiver that does not start ends the script with exit
code 1.
"""

from __future__ import annotations

import argparse
import copy
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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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
from pydicom.uid import generate_uid  # noqa: E402

from tests import realct  # noqa: E402
from tests.orthanc import Orthanc, start_orthanc  # noqa: E402
from tests.synthetic import couch_phantom, write_volume_series  # noqa: E402

TARGET_SECONDS = 10.0  # the bar: last instance received -> RTSTRUCT stored, quiet period excluded
PROCESSING_TARGET_SECONDS = 6.0  # the target: the node's processing of a real 100-slice CT
RSS_TARGET_MIB = 1536.0  # 1.5 GiB, as bench_infer
JUDGED_KIND = "lung100"
KINDS = ("phantom", "lung1", "lung2", "lung100")
LUNG100_SOURCE, LUNG100_SLICES = "lung2", 100
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
    #: every ``VmHWM`` reading (KiB by pid); ``peaks_reset`` is False once ``clear_refs`` is refused
    rss_readings: list[dict[int, int]] = field(default_factory=list)
    peaks_reset: bool = True


@dataclass
class Kind:
    """One CT kind: what it is, and the folders of its studies (one per run, fresh UIDs each)."""

    name: str
    slices: int
    size: int
    spacing_mm: float
    source: str
    folders: list[Path]
    study_mb: float = 0.0

    def __post_init__(self) -> None:
        self.study_mb = sum(p.stat().st_size for p in self.folders[0].iterdir()) / 1e6


# --------------------------------------------------------------------------- data


def write_phantom(root: Path, count: int, slices: int, size: int) -> Kind:
    """Write the couch phantom as *count* studies (fresh UIDs each)."""
    pixel = FIELD_MM / size
    volume, _masks = couch_phantom(0, (slices, size, size), (SLICE_MM, pixel, pixel))
    folders = [write_volume_series(root / f"phantom{index}", volume).folder for index in range(count)]
    del volume, _masks
    return Kind("phantom", slices, size, SLICE_MM, f"couch phantom, {FIELD_MM:g} mm field", folders)


def real_chest(source: str) -> Any:
    """``tests.realct``'s chest CT *source* (``lung1``, ``lung2``) in memory: fetched (pip download) and converted
    (plastimatch) on the first call on this machine, then read from its cache."""
    try:
        return realct._chest(source)
    except pytest.fail.Exception as exc:  # tests.realct's pytest.fail (no plastimatch, no index): a BaseException
        hint = "" if shutil.which("plastimatch") else " (plastimatch not found: apt-get install plastimatch)"
        raise BenchError(f"real CT {source} cannot be obtained{hint}: {exc}") from None


def _z(header: Any) -> float:
    return float(header.ImagePositionPatient[2])


def resliced(ct: Any, slices: int) -> Any:
    """*ct* (axial, sorted foot to head, evenly spaced) as *slices* slices over the same z extent: each new slice
    linearly interpolated along z between its two neighbouring real slices; its header a copy of the nearer
    one's with Image Position (Patient), Slice Location and Slice Thickness of the new grid."""
    count = len(ct.headers)
    gaps = np.diff([_z(h) for h in ct.headers])
    if count < 2 or not np.allclose(gaps, gaps[0], atol=1e-3) or gaps[0] <= 0:
        raise BenchError("the real CT to re-slice is not evenly spaced from foot to head")
    first = np.array([float(v) for v in ct.headers[0].ImagePositionPatient])
    last = np.array([float(v) for v in ct.headers[-1].ImagePositionPatient])
    spacing = float(last[2] - first[2]) / (slices - 1)
    headers, planes = [], []
    for index, at in enumerate(np.linspace(0.0, count - 1, slices)):
        below = min(int(np.floor(at)), count - 2)
        weight = at - below
        plane = (1 - weight) * ct.hu[below].astype(np.float32) + weight * ct.hu[below + 1].astype(np.float32)
        planes.append(np.round(plane).astype(np.int16))
        ds = copy.deepcopy(ct.headers[round(float(at))])
        position = first + (last - first) * index / (slices - 1)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SliceLocation = f"{position[2]:.6f}"
        ds.SliceThickness = f"{spacing:.6f}"
        headers.append(ds)
    return type(ct)(tuple(headers), np.stack(planes))


def write_real(root: Path, name: str, count: int) -> Kind:
    """Write the real CT *name* (``lung1``, ``lung2``, ``lung100``) as *count* studies (fresh UIDs each)."""
    source = LUNG100_SOURCE if name == "lung100" else name
    ct = real_chest(source)
    real_slices, real_mm = len(ct.headers), float(ct.headers[0].SliceThickness)
    described = f"pyradiomics {source} through plastimatch, {real_slices} slices of {real_mm:g} mm"
    if name == "lung100":
        if real_slices >= LUNG100_SLICES:
            raise BenchError(f"{source} has {real_slices} slices; lung100 expects fewer, to re-slice")
        ct = resliced(ct, LUNG100_SLICES)
        described += f", re-sliced linearly along z to {LUNG100_SLICES} over the same extent"
    spacing = abs(_z(ct.headers[-1]) - _z(ct.headers[0])) / (len(ct.headers) - 1)
    folders = []
    for index in range(count):
        stamp = realct._Stamp(realct.CANARY_PATIENT, realct._study_uid(None), str(generate_uid()),
                              ("DERIVED", "SECONDARY", "AXIAL"), f"Thorax {spacing:.1f}mm", 1)
        folders.append(realct._write(root / f"{name}-{index}", ct, stamp).folder)
    return Kind(name, len(ct.headers), int(ct.headers[0].Rows), round(spacing, 3), described, folders)


def write_studies(root: Path, kinds: list[str], runs: int, warmup: int, args: argparse.Namespace) -> dict[str, Kind]:
    """Every study of the benchmark, by CT kind; the first kind has *warmup* more, sent first."""
    written = {}
    for name in kinds:
        count = runs + (warmup if name == kinds[0] else 0)
        written[name] = (write_phantom(root, count, args.slices, args.size) if name == "phantom"
                         else write_real(root, name, count))
    os.sync()
    return written


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


def read_peaks(bench: Bench) -> float:
    """The node group's summed ``VmHWM`` (MiB) since the last reading; the peaks are reset after reading."""
    reading = group_hwm_kib(bench.node.pid)
    bench.rss_readings.append(reading)
    for pid in reading:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except FileNotFoundError:  # the process has ended
            continue
        except OSError:
            bench.peaks_reset = False
    return sum(reading.values()) / 1024


def run_once(bench: Bench, folder: Path) -> dict[str, Any]:
    """Send one study after the machine settled; return its figures."""
    if bench.orthanc.process is None:
        raise BenchError("Orthanc is not running")
    settle([bench.node.pid, bench.orthanc.process.pid])
    mark, since = len(read_events(bench.node_log)), last_change(bench.orthanc)
    started = time.time()
    sender_exit = send_study(bench, folder)
    stored, events = wait_result(bench, mark, since)
    result = figures(events, stored=stored, sender_exit=sender_exit, started=started, quiet=bench.quiet_seconds)
    result["peak_rss_mib"] = round(read_peaks(bench), 1)
    return result


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
            "processing_s": round(done["processing_ms"] / 1000, 3),
            "stages_s": round(sum(stage_ms[s] for s in STAGES[:-1]) / 1000, 3),
            "sending_s": round(sender_exit - started, 3),
            "sender_exit_after_last_received_ms": round((sender_exit - last) * 1000),
            "stored_after_send_succeeded_ms": round((stored - _ts(by_name["send_succeeded"])) * 1000),
            "node_latency_ms": done["latency_ms"], "node_processing_ms": done["processing_ms"]}


# --------------------------------------------------------------------------- report


def session_rss(bench: Bench) -> dict[str, Any]:
    """The node group's session peak (MiB): each process's largest reading, summed."""
    largest: dict[int, int] = {}
    for reading in bench.rss_readings:
        for pid, kib in reading.items():
            largest[pid] = max(largest.get(pid, 0), kib)
    per_process = [kib / 1024 for _pid, kib in sorted(largest.items())]
    return {"total_mib": round(sum(per_process), 1), "per_process_mib": [round(v, 1) for v in per_process],
            "per_run": bench.peaks_reset}


def summarize(runs: list[dict[str, Any]], per_run_rss: bool) -> dict[str, Any]:
    """Medians over the runs, and the largest peak RSS of any run (where runs have their own)."""
    def median(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    split = {k: round(statistics.median(r["split_ms"][k] for r in runs)) for k in runs[0]["split_ms"]}
    return {"e2e_s": round(median("e2e_s"), 3), "split_ms": split, "processing_s": round(median("processing_s"), 3),
            "stages_s": round(median("stages_s"), 3), "inference_s": round(median("inference_s"), 2),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs) if per_run_rss else None}


def verdicts(result: dict[str, Any]) -> dict[str, Any] | None:
    """The bar and the targets, judged on the median ``lung100`` run; None when it was not run."""
    judged = result["kinds"].get(JUDGED_KIND)
    if judged is None:
        return None
    median = judged["median"]
    rss = median["peak_rss_mib"] if median["peak_rss_mib"] is not None else result["node_peak_rss"]["total_mib"]

    def verdict(value: float, target: float) -> dict[str, Any]:
        return {"value": value, "target": target, "ratio": round(value / target, 3), "met": value <= target}

    return {"kind": JUDGED_KIND, "e2e_s": verdict(median["e2e_s"], TARGET_SECONDS),
            "processing_s": verdict(median["processing_s"], PROCESSING_TARGET_SECONDS),
            "peak_rss_mib": verdict(rss, RSS_TARGET_MIB)}


def _split_text(split: dict[str, int]) -> str:
    return ", ".join(f"{name} {ms / 1000:.2f}" for name, ms in split.items())


def _print_run(label: str, run: dict[str, Any]) -> None:
    print(f"  {label}: {run['e2e_s']:6.2f} s = {_split_text(run['split_ms'])}; model {run['inference_s']:.2f} s, "
          f"processing {run['processing_s']:.2f} s, peak RSS {run['peak_rss_mib']:.0f} MiB")
    print(f"         checks: storescu {run['sending_s']:.2f} s, exiting "
          f"{run['sender_exit_after_last_received_ms']} ms after the last instance; RTSTRUCT seen "
          f"{run['stored_after_send_succeeded_ms']} ms after send_succeeded")


def _met(item: dict[str, Any]) -> str:
    return "met" if item["met"] else "MISSED"


def print_report(result: dict[str, Any]) -> None:
    print(f"\nquiet period {result['quiet_seconds']:g} s, {result['cpus']} CPUs, Orthanc {result['orthanc_version']}")
    print("seconds from the last instance received to the RTSTRUCT stored in Orthanc, minus the quiet period:")
    for index, run in enumerate(result["warmup"], start=1):
        _print_run(f"warm-up {index} ({result['warmup_kind']}, loads the model, not in the medians)", run)
    for name, kind in result["kinds"].items():
        print(f"\n{name}: {kind['slices']} slices of {kind['size']}x{kind['size']}, {kind['spacing_mm']:g} mm apart "
              f"({kind['study_mb']:.1f} MB); {kind['source']}")
        for index, run in enumerate(kind["runs"], start=1):
            _print_run(f"run {index}", run)
        median = kind["median"]
        print(f"  median: {median['e2e_s']:.2f} s = {_split_text(median['split_ms'])}")
        print(f"          processing {median['processing_s']:.2f} s (the four stages before send "
              f"{median['stages_s']:.2f} s), model {median['inference_s']:.2f} s")
    print("\nmedians (s)   slices  total   wait  pseud  infer  struc  reid   send  other  process  RSS MiB")
    for name, kind in result["kinds"].items():
        median, split = kind["median"], kind["median"]["split_ms"]
        rss = f"{median['peak_rss_mib']:7.0f}" if median["peak_rss_mib"] is not None else "      -"
        print(f"  {name:<10} {kind['slices']:>7} {median['e2e_s']:6.2f} "
              + " ".join(f"{split[k] / 1000:6.2f}" for k in split) + f" {median['processing_s']:8.2f}  {rss}")
    rss = result["node_peak_rss"]
    print(f"node peak RSS over the session: {rss['total_mib']:.0f} MiB over {len(rss['per_process_mib'])} processes "
          f"({', '.join(f'{v:.0f}' for v in rss['per_process_mib'])} MiB)"
          + ("" if rss["per_run"] else "; the peaks could not be reset, so no run has its own"))
    judged = result["verdicts"]
    if judged is None:
        print(f"the bar and the targets are judged on {JUDGED_KIND}, which this run left out (--ct)")
    else:
        e2e, processing, peak = judged["e2e_s"], judged["processing_s"], judged["peak_rss_mib"]
        print(f"{JUDGED_KIND} (median): bar <= {TARGET_SECONDS:g} s last received -> stored: {e2e['value']:.2f} s, "
              f"ratio {e2e['ratio']:.2f}, {_met(e2e)}")
        print(f"{JUDGED_KIND} (median): target <= {PROCESSING_TARGET_SECONDS:g} s processing: "
              f"{processing['value']:.2f} s, ratio {processing['ratio']:.2f}, {_met(processing)}")
        print(f"{JUDGED_KIND}: target peak RSS <= {RSS_TARGET_MIB:.0f} MiB: {peak['value']:.0f} MiB, "
              f"ratio {peak['ratio']:.2f}, {_met(peak)}")
    print(json.dumps({"benchmark": "e2e", **result}))


# --------------------------------------------------------------------------- main


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Write the studies, start Orthanc and the node, run, and collect the figures."""
    if not _orthanc_binary_present():
        raise BenchError("Orthanc not found (apt-get install orthanc)")
    names = list(KINDS) if args.ct == "all" else [args.ct]
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_e2e_", dir=args.tmpdir)))
        print(f"writing {args.runs} studies of {', '.join(names)} (and {args.warmup} warm-up) under {root} ...",
              flush=True)
        kinds = write_studies(root, names, args.runs, args.warmup, args)
        orthanc = start_orthanc(root / "orthanc", allowed_aet=NODE_AET)
        stack.callback(orthanc.stop)
        node = start_node(stack, root, orthanc, args)
        print(f"node on port {node.node_port}, Orthanc on {orthanc.dicom_port}", flush=True)
        read_peaks(node)  # start-up, into the session's figure
        first = kinds[names[0]]
        warmup = []
        for index, folder in enumerate(first.folders[args.runs:], start=1):
            warmup.append(run_once(node, folder))
            print(f"  warm-up {index}/{args.warmup} ({first.name}): {warmup[-1]['e2e_s']:.2f} s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for index in range(args.runs):
            for name in names:
                runs[name].append(run_once(node, kinds[name].folders[index]))
                print(f"  run {index + 1}/{args.runs} {name}: {runs[name][-1]['e2e_s']:.2f} s", flush=True)
        version = json.loads(_rest(orthanc, "/system")).get("Version")
    result: dict[str, Any] = {
        "quiet_seconds": args.quiet, "cpus": len(os.sched_getaffinity(0)), "orthanc_version": version,
        "target_s": TARGET_SECONDS, "processing_target_s": PROCESSING_TARGET_SECONDS,
        "rss_target_mib": RSS_TARGET_MIB, "warmup_kind": first.name, "warmup": warmup,
        "kinds": {name: {"slices": kind.slices, "size": kind.size, "spacing_mm": kind.spacing_mm,
                         "study_mb": round(kind.study_mb, 1), "source": kind.source, "runs": runs[name],
                         "median": summarize(runs[name], node.peaks_reset)} for name, kind in kinds.items()},
        "node_peak_rss": session_rss(node)}
    result["verdicts"] = verdicts(result)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ct", choices=(*KINDS, "all"), default="all",
                        help="the CT sent: the phantom, a real chest CT, the 100-slice re-sliced one, or all four")
    parser.add_argument("--runs", type=int, default=3, help="studies sent of each CT kind")
    parser.add_argument("--warmup", type=int, default=1,
                        help="studies of the first CT kind sent first, left out of the medians (model load)")
    parser.add_argument("--slices", type=int, default=100, help="slices of the phantom")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each phantom slice")
    parser.add_argument("--quiet", type=float, default=2.0, help="the peer's quiet_seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the temporary folder goes")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.slices < 1 or args.size < 64 or args.quiet < 1:
        parser.error("need --runs >= 1, --warmup >= 0, --slices >= 1, --size >= 64 and --quiet >= 1")
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
