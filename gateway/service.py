"""Wiring of the running node: spool, job table, receivers, completion timer, job runner, retention sweeps."""

from __future__ import annotations

import functools
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.errors import StartupError
from gateway.inference.farm import TritonFarm
from gateway.ops.audit import AuditLog
from gateway.ops.metrics import Metrics, MetricsServer
from gateway.ops.retention import Shredder
from gateway.ops.sweeps import SweepSchedule
from gateway.pipeline.runner import Runner
from gateway.receiving.assembly import Assembler, complete_due
from gateway.receiving.listener import Listener
from gateway.store.anchors import RetentionClock, check_master_key, record_audit_head
from gateway.store.jobs import Job, JobState, JobStore
from gateway.store.keys import KeyRing
from gateway.store.outputs import StageContext
from gateway.store.sealing import Sealer
from gateway.store.spool import Spool

__all__ = ["Node", "serve"]

log = structlog.get_logger(__name__)


class Node:
    """The gateway node: call :meth:`start`, later :meth:`stop`."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.spool = Spool(config.node.data_dir)
        self._jobs: JobStore | None = None
        self._listener = Listener(config)
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._runner: Runner | None = None
        self._shredder: Shredder | None = None
        self._schedule: SweepSchedule | None = None
        self._metrics_server: MetricsServer | None = None
        self._farm: TritonFarm | None = None

    def start(self) -> None:
        """Recover state, then accept associations and run the completion timer.

        Raises
        ------
        StartupError
            When ``data_dir`` cannot be used or the port cannot be bound.
        """
        node = self.config.node
        try:
            self.spool.prepare()
            self.spool.restrict_modes()
            self._jobs = JobStore(self.spool.database_path)
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(f"cannot use data_dir {node.data_dir} ({exc})") from exc
        ring = KeyRing.open(self.config)
        check_master_key(self._jobs, ring.master.key_id)  # another key: refused before any job runs
        Assembler(self.spool, self._jobs, ring).reconcile()
        complete_due(self._jobs, time.time())  # quiet periods that ended while the node was down
        audit = AuditLog(self.spool.audit_path, syslog_address=self.config.audit.syslog_address,
                         anchor=functools.partial(record_audit_head, self._jobs))
        ctx = StageContext(self.spool, self._jobs, Sealer(ring, self._jobs))
        metrics = Metrics(self._listener.counters, self._jobs, node.data_dir, self.config.retention.max_age_seconds)
        self._farm = TritonFarm(self.config.inference, metrics) if self.config.inference.backend == "triton" else None
        self._runner = Runner(self.config, ctx, audit, on_done=self._on_job_done, metrics=metrics, farm=self._farm)
        self._shredder = Shredder(self.spool, self._jobs, self.config.retention, audit, keys=ring.files,
                                  clock=RetentionClock(self._jobs).now, busy=self._runner.is_busy,
                                  on_sweep=metrics.sweep)
        caught_up = self._shredder.sweep()  # what fell due while the node was down, before anyone may connect
        log.info("startup_sweep_done", jobs=len(caught_up.jobs), exports=len(caught_up.exports),
                 orphans=len(caught_up.orphans))
        try:
            self._listener.start()
        except StartupError:
            raise
        except OSError as exc:
            raise StartupError(f"cannot start receiving ({exc.strerror or type(exc).__name__})") from exc
        self._runner.start()  # resumes every unfinished job where it stopped
        self._schedule = SweepSchedule(self._shredder, self.config.retention.sweep_interval_seconds)
        self._schedule.start()
        self._timer = threading.Thread(target=self._complete_loop, args=(self._jobs,), name="completion",
                                       daemon=True)
        self._timer.start()
        self._metrics_server = self._serve_metrics(metrics)
        plain, tls = self._listener.address, self._listener.tls_address
        log.info("node_started", version=__version__, ae_title=node.ae_title, bind=node.bind,
                 port=plain[1] if plain else None, tls_port=tls[1] if tls else None,
                 mutual_tls=bool(node.tls and node.tls.require_client_certificate),
                 receive_workers=node.receive_workers, max_associations=node.max_associations,
                 peers=len(self.config.peers), destinations=len(self.config.destinations),
                 routes=len(self.config.routes), pipeline_workers=self.config.pipeline.workers,
                 metrics_port=self._metrics_server.port if self._metrics_server else None)

    def _serve_metrics(self, metrics: Metrics) -> MetricsServer | None:
        endpoint = self.config.metrics
        if not endpoint.enabled:
            return None
        schedule = self._schedule
        checks = {"scp_accepting": self._listener.healthy,
                  "scheduler_running": lambda: schedule is not None and schedule.running}
        details: dict[str, Callable[[], object]] = {}
        farm = self._farm
        if farm is not None:  # the node still receives with every server down: the pool is a check of its own
            checks["inference_servers"] = farm.healthy
            details["inference_servers"] = farm.pool
        try:
            server = MetricsServer(metrics, endpoint.bind, endpoint.port, checks, details)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {endpoint.bind}:{endpoint.port} ({exc.strerror})") from exc
        server.start()
        return server

    def _on_job_done(self, job: Job) -> None:
        if job.state is JobState.SENT and self._shredder is not None:
            self._shredder.shred_delivered(job.job_id)  # the TPS has it: nothing to keep

    def _complete_loop(self, jobs: JobStore) -> None:
        interval = self.config.node.completion_check_seconds
        wait = interval
        while not self._stop.wait(wait):
            try:
                if complete_due(jobs, time.time()) and self._runner is not None:
                    self._runner.wake()
                due = jobs.next_completion_at()
            except Exception as exc:  # keep the timer alive; the next tick retries
                log.error("completion_check_failed", exc_info=exc)
                due = None
            # Wake when the earliest quiet period ends, not up to a whole interval later.
            wait = interval if due is None else min(interval, max(0.02, due - time.time()))

    def stop(self) -> None:
        """Stop accepting, finish associations in flight, stop the timer, let stages in progress commit."""
        log.info("node_stopping")
        self._stop.set()
        self._listener.stop()
        if self._timer is not None:
            self._timer.join(timeout=10)
        if self._runner is not None:
            self._runner.stop()
        if self._farm is not None:
            self._farm.close()
        if self._schedule is not None:
            self._schedule.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self._jobs is not None:
            self._jobs.close()
        log.info("node_stopped")


def serve(config: GatewayConfig) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node = Node(config)
    node.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
