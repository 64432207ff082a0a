"""Prometheus metrics and ``/healthz`` over HTTP (localhost by default); no patient data in any name or label.

Receiver processes count associations and instances in a shared array (:class:`NodeCounters`);
the main process adds stage durations, send outcomes and retention results, and reads job
states, the age of the oldest data it holds and free disk space at each scrape.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.store.jobs import JobStore
from gateway.store.tasks import TaskStore

__all__ = ["ASSOCIATION_OUTCOMES", "STORE_REFUSALS", "Metrics", "MetricsServer", "NodeCounters"]

#: Outcomes of an incoming connection, as counted by the listener and the receivers.
ASSOCIATION_OUTCOMES = ("accepted", "calling_ae_not_recognised", "called_ae_not_recognised", "local_limit_exceeded",
                       "disk_space_low", "address_not_allowed", "too_many_pending_connections",
                       "client_certificate_missing", "client_certificate_mismatch")
#: Why a receiver refused a C-STORE (the ``reason`` of its ``store_refused``/``store_failed`` event).
STORE_REFUSALS = ("no_data_set_or_peer", "disk_space_low", "dataset_too_large", "too_many_pixels", "undecodable",
                  "missing_or_invalid_uid", "dataset_does_not_match_request", "out_of_resources", "internal_error")
_NAMES = (*(f"association_{outcome}" for outcome in ASSOCIATION_OUTCOMES), "instances_stored", "instances_refused",
          *(f"instances_refused_{reason}" for reason in STORE_REFUSALS))


class NodeCounters:
    """Counters shared by the listener (row 0) and the receiver processes (one row each), in shared memory.

    Each process writes only its own row, under a lock of its own threads: no lock is shared between
    processes, so counting costs a C-STORE nothing it would wait for. Readers sum the rows.
    """

    def __init__(self, array: Any, row: int = 0) -> None:
        self.array = array
        self._base = row * len(_NAMES)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, context: Any, receivers: int) -> NodeCounters:
        """Counters for the listener and *receivers* receiver processes (row 0 is the caller's)."""
        return cls(context.Array("q", (receivers + 1) * len(_NAMES), lock=False))

    def add(self, name: str, count: int = 1) -> None:
        """Add *count* to the counter *name* (this process's row)."""
        with self._lock:
            self.array[self._base + _NAMES.index(name)] += count

    def refused(self, reason: str) -> None:
        """One C-STORE refused for *reason* (one of :data:`STORE_REFUSALS`)."""
        with self._lock:
            self.array[self._base + _NAMES.index("instances_refused")] += 1
            self.array[self._base + _NAMES.index(f"instances_refused_{reason}")] += 1

    def value(self, name: str) -> int:
        """The counter *name* summed over every process."""
        index, width = _NAMES.index(name), len(_NAMES)
        return int(sum(self.array[row * width + index] for row in range(len(self.array) // width)))


class Metrics:
    """The main process's metrics; the pipeline and retention report to it."""

    def __init__(self, counters: NodeCounters, jobs: JobStore, data_dir: Any, max_age_seconds: float) -> None:
        self.registry = CollectorRegistry()
        self.counters = counters
        self._stage = Histogram("gateway_stage_duration_seconds", "Duration of each pipeline stage", ["stage"],
                                buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=self.registry)
        self._sent = Counter("gateway_deliveries_total", "Delivery attempts that ended, by destination and outcome",
                             ["destination", "outcome"], registry=self.registry)
        self._shredded = Counter("gateway_retention_shredded_total", "Jobs shredded, by reason", ["why"],
                                 registry=self.registry)
        self._sweeps = Counter("gateway_retention_sweeps_total", "Retention sweeps run", registry=self.registry)
        self._shred_failures = Counter("gateway_retention_shred_failures_total", "Jobs a sweep could not shred "
                                       "(retried by the next sweep)", registry=self.registry)
        self._quarantined = Counter("gateway_quarantined_instances_total",
                                    "Received instances set aside unprocessed, by reason code", ["reason"],
                                    registry=self.registry)
        self._failures = Counter("gateway_failures_total", "Jobs and series that ended failed, by stage and reason "
                                 "code (nothing was sent for them)", ["stage", "reason"], registry=self.registry)
        self._qa = Counter("gateway_qa_checks_total", "Contour plausibility checks, by check and outcome",
                           ["check", "outcome"], registry=self.registry)
        self._waits = Counter("gateway_stage_waits_total", "Times a series was put off because a stage could not "
                              "run now (no inference server), by stage and reason", ["stage", "reason"],
                              registry=self.registry)
        self._remote_requests = Counter("gateway_inference_requests_total", "Requests to inference servers that "
                                        "ended, by server and outcome", ["server", "outcome"], registry=self.registry)
        self._remote_seconds = Histogram("gateway_inference_request_seconds", "Duration of requests to inference "
                                         "servers", ["server"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
                                         registry=self.registry)
        self._remote_up = Gauge("gateway_inference_server_up", "1 while an inference server is usable, 0 while it "
                                "is marked down", ["server"], registry=self.registry)
        self.state = _StateCollector(counters, jobs, data_dir, max_age_seconds)
        self.registry.register(self.state)

    def waiting(self, stage: str, reason: str) -> None:
        """A stage could not run now and waits (no inference server): counted each time it is put off."""
        self._waits.labels(stage, reason).inc()

    def inference_request(self, server: str, outcome: str, seconds: float) -> None:
        """One request to an inference server ended (``ok`` or ``failed``)."""
        self._remote_requests.labels(server, outcome).inc()
        self._remote_seconds.labels(server).observe(seconds)

    def inference_server_up(self, server: str, up: bool) -> None:
        """An inference server was found up (probe) or marked down (a failed request)."""
        self._remote_up.labels(server).set(1 if up else 0)

    def stage(self, stage: str, seconds: float) -> None:
        """One stage of one job or series finished."""
        self._stage.labels(stage).observe(seconds)

    def quarantined(self, by_reason: dict[str, int]) -> None:
        """Instances of a job were quarantined (reason code -> count)."""
        for reason, count in by_reason.items():
            self._quarantined.labels(reason).inc(count)

    def failure(self, stage: str, reason: str) -> None:
        """A job or series ended failed at *stage* with *reason* (a code, never patient data)."""
        self._failures.labels(stage, reason).inc()

    def qa_check(self, check: str, outcome: str) -> None:
        """One plausibility check of one structure ended ``pass``, ``warn`` or ``fail``."""
        self._qa.labels(check.split(":", 1)[0], outcome).inc()

    def delivery(self, destination: str, outcome: str) -> None:
        """A delivery ended (``sent`` or ``dead_letter``)."""
        self._sent.labels(destination, outcome).inc()

    def sweep(self, shredded_by_reason: dict[str, int], swept: bool = True) -> None:
        """Jobs were shredded: by a retention sweep (*swept*), or on delivery; ``failed`` counts those that were not."""
        if swept:
            self._sweeps.inc()
        for why, count in shredded_by_reason.items():
            if why == "failed":
                self._shred_failures.inc(count)
            else:
                self._shredded.labels(why).inc(count)


class _StateCollector(Collector):
    def __init__(self, counters: NodeCounters, jobs: JobStore, data_dir: Any, max_age_seconds: float) -> None:
        self._counters = counters
        self._jobs = jobs
        self._data_dir = data_dir
        self.max_age_seconds = max_age_seconds

    def oldest_age(self, now: float) -> float:
        """Seconds since the first instance of the oldest data still held (0 when none)."""
        received = [job.created_at for job in self._jobs.jobs()]
        received += [export.received_at for export in TaskStore(self._jobs).exports()]
        return max(0.0, now - min(received)) if received else 0.0

    def collect(self) -> Iterator[Any]:
        associations = CounterMetricFamily("gateway_associations", "Incoming connections by outcome",
                                           labels=["outcome"])
        for outcome in ASSOCIATION_OUTCOMES:
            associations.add_metric([outcome], self._counters.value(f"association_{outcome}"))
        yield associations
        instances = CounterMetricFamily("gateway_instances", "C-STORE requests by outcome", labels=["outcome"])
        instances.add_metric(["stored"], self._counters.value("instances_stored"))
        instances.add_metric(["refused"], self._counters.value("instances_refused"))
        yield instances
        refusals = CounterMetricFamily("gateway_instances_refused", "C-STORE requests refused, by reason",
                                       labels=["reason"])
        for reason in STORE_REFUSALS:
            refusals.add_metric([reason], self._counters.value(f"instances_refused_{reason}"))
        yield refusals
        states = GaugeMetricFamily("gateway_jobs", "Jobs in the table by state", labels=["state"])
        counts: dict[str, int] = {}
        for job in self._jobs.jobs():
            counts[job.state.value] = counts.get(job.state.value, 0) + 1
        for state, count in sorted(counts.items()):
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily("gateway_oldest_data_age_seconds", "Age of the oldest patient data held (the 24 h "
                                "promise: must stay below gateway_max_age_seconds)", value=self.oldest_age(time.time()))
        yield GaugeMetricFamily("gateway_max_age_seconds", "Retention ceiling", value=self.max_age_seconds)
        yield GaugeMetricFamily("gateway_disk_free_bytes", "Free space in data_dir",
                                value=shutil.disk_usage(self._data_dir).free)


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/healthz`` (JSON; 503 when unhealthy) on a small HTTP server."""

    def __init__(self, metrics: Metrics, bind: str, port: int, checks: dict[str, Callable[[], bool]],
                 details: dict[str, Callable[[], object]] | None = None) -> None:
        self._metrics = metrics
        self._checks = checks
        self._details = details or {}
        handler = _handler(self)
        self._server = ThreadingHTTPServer((bind, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (real when the configuration asked for 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def health(self) -> tuple[bool, dict[str, bool]]:
        """Every check, and whether all pass."""
        results = {name: _safe(check) for name, check in self._checks.items()}
        results["data_within_ceiling"] = (self._metrics.state.oldest_age(time.time())
                                          < self._metrics.state.max_age_seconds)
        return all(results.values()), results

    def details(self) -> dict[str, object]:
        """What ``/healthz`` shows beside the checks (the inference servers' states)."""
        return {name: _safe_detail(detail) for name, detail in self._details.items()}

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of every metric."""
        return bytes(generate_latest(self._metrics.registry))


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


def _safe_detail(detail: Callable[[], object]) -> object:
    try:
        return detail()
    except Exception:
        return None


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, server.metrics_text())
            elif self.path == "/healthz":
                healthy, checks = server.health()
                body = json.dumps({"status": "ok" if healthy else "unhealthy", "checks": checks,
                                   **server.details()}).encode()
                self._reply(200 if healthy else 503, "application/json", body)
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are not worth a log line each

    return Handler
