"""Command line: ``python -m gateway {serve,status,complete,echo,shred,qa,release,audit verify} --config FILE``,
``keygen``, ``triton-repo``; the commands and their arguments are :mod:`gateway.cli_args`."""

from __future__ import annotations

import argparse
import base64
import functools
import getpass
import os
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from gateway.cli_args import command_line
from gateway.config import Destination, GatewayConfig, load_config, load_sweep_config
from gateway.errors import ConfigError, GatewayError, SendError, StartupError
from gateway.inference.model_cache import Predictors, check_route_models
from gateway.inference.triton_repo import write_repository
from gateway.ops.audit import AuditLog, verification_lines, verify
from gateway.ops.logs import configure_logging
from gateway.ops.process import configure_process
from gateway.ops.retention import SweepReport
from gateway.ops.review import qa_lines, release_held
from gateway.ops.status import status_lines
from gateway.ops.sweeps import sweep_lines, sweep_once
from gateway.ops.tls import check_certificates
from gateway.receiving.assembly import force_complete
from gateway.rt.templates import load_route_templates, manifests_of
from gateway.sending.scu import Sender
from gateway.service import serve
from gateway.store.anchors import audit_head, check_master_key, record_audit_head
from gateway.store.jobs import JobStore
from gateway.store.keys import KeyRing, MasterKey, create_key_file
from gateway.store.outputs import StageContext, load_output
from gateway.store.sealing import Sealer
from gateway.store.spool import Spool

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _shred(path: str, dry_run: bool, loop: bool) -> int:
    config, ignored = load_sweep_config(path)  # the rest of the file may be invalid: retention must not wait
    configure_logging(config.logging.level, config.logging.format, stream=sys.stderr)
    for problem in ignored:
        print(f"ignored (not needed to shred): {problem}", file=sys.stderr)
    stop = _stop_on_signals() if loop else None
    while True:
        try:
            outcome = _print_sweep(*sweep_once(config, dry_run=dry_run))
        except (GatewayError, OSError, sqlite3.Error) as exc:  # with --loop the next run retries
            print(f"error: cannot sweep {config.node.data_dir}: {exc}", file=sys.stderr)
            outcome = EXIT_FAILURE
        if stop is None:
            return outcome
        if stop.wait(config.retention.sweep_interval_seconds):
            return EXIT_OK


def _print_sweep(report: SweepReport, notes: list[str]) -> int:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    done, failed = sweep_lines(report)
    for line in done:
        print(line)
    for line in failed:
        print(line, file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    return stop


def _keygen(out: str | None, env_file: str | None) -> int:

    key = secrets.token_bytes(32)
    path = Path(out or env_file or "")
    content = key if out else f"CONTOUR_GW_MASTER_KEY={base64.b64encode(key).decode()}\n".encode()
    try:
        create_key_file(path, content)
    except FileExistsError:
        print(f"error: {path} exists; a master key is never overwritten (its data would be lost)", file=sys.stderr)
        return EXIT_FAILURE
    print(f"master key written to {path} (mode 0600); keep a copy offline: without it nothing held can be read")
    return EXIT_OK


def _qa(config: GatewayConfig, job_id: str, series: int, out: str | None) -> int:
    spool = Spool(config.node.data_dir)
    jobs = JobStore(spool.database_path)
    try:
        for line in qa_lines(jobs, job_id):
            print(line)
        if out is None:
            return EXIT_OK
        picture = load_output(StageContext(spool, jobs, Sealer(KeyRing.open(config), jobs)), job_id, series, "qa-png")
    except (FileNotFoundError, ValueError):
        print(f"job {job_id} series {series} has no QA picture (route without qa_picture, or shredded)",
              file=sys.stderr)
        return EXIT_FAILURE
    finally:
        jobs.close()
    with os.fdopen(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(picture)
    print(f"QA picture of job {job_id} series {series}: {out}")
    return EXIT_OK


def _release(config: GatewayConfig, job_id: str) -> int:
    spool = Spool(config.node.data_dir)
    jobs = JobStore(spool.database_path)
    try:
        audit = AuditLog(spool.audit_path, syslog_address=config.audit.syslog_address,
                         anchor=functools.partial(record_audit_head, jobs))
        released = release_held(jobs, job_id, audit, time.time(), _account())
    finally:
        jobs.close()
    if not released:
        print(f"job {job_id} has no series held by contour QA", file=sys.stderr)
        return EXIT_FAILURE
    print(f"job {job_id}: series {', '.join(map(str, released))} released; the node sends them")
    return EXIT_OK


def _account() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        return f"uid {os.getuid()}"


def _audit_verify(config: GatewayConfig) -> int:
    spool = Spool(config.node.data_dir)
    ceiling = config.retention.max_age_seconds
    held: dict[str, float] = {}
    head = None
    if spool.database_path.exists():
        jobs = JobStore(spool.database_path)
        try:
            held = {job.job_id: job.created_at for job in jobs.jobs()}
            head = audit_head(jobs)
        finally:
            jobs.close()
    result = verify(spool.audit_path, ceiling, time.time(), held=held, head=head)
    lines, problems = verification_lines(result, ceiling, time.time())
    for line in problems:
        print(line, file=sys.stderr)
    for line in lines:
        print(line)
    return EXIT_OK if result.ok else EXIT_FAILURE


def _status(config: GatewayConfig) -> int:
    spool = Spool(config.node.data_dir)
    if not spool.database_path.exists():
        print("no jobs (the node has not run with this data_dir yet)")
        return EXIT_OK
    jobs = JobStore(spool.database_path)
    try:
        for line in status_lines(jobs, time.time()):
            print(line)
    finally:
        jobs.close()
    return EXIT_OK


def _complete(config: GatewayConfig, job_id: str) -> int:
    spool = Spool(config.node.data_dir)
    spool.prepare()
    jobs = JobStore(spool.database_path)
    try:
        job = force_complete(jobs, job_id, time.time())
    finally:
        jobs.close()
    print(f"{job.job_id} {job.state.value} ({job.instance_count} instances)")
    return EXIT_OK


def _echo(config: GatewayConfig, name: str) -> int:
    try:
        destination = config.destination(name)
    except KeyError:
        known = ", ".join(d.name for d in config.destinations) or "none configured"
        print(f"unknown destination {name!r} (known: {known})", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(destination, Destination):
        print(f"{name!r} is a folder destination: nothing to echo", file=sys.stderr)
        return EXIT_CONFIG
    try:
        Sender(config).echo(destination)
    except SendError as exc:
        print(f"echo {name}: FAILED: {exc.reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"echo {name}: success")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = command_line().parse_args(argv)
    if sys.flags.optimize:
        print("error: run without -O or PYTHONOPTIMIZE: pynetdicom checks received PDUs with assert statements",
              file=sys.stderr)
        return EXIT_CONFIG
    configure_process()  # owner-only files and folders whatever the umask, pynetdicom's settings, warnings
    try:
        if args.command == "keygen":
            return _keygen(args.out, args.env_file)
        if args.command == "shred":
            return _shred(args.config, args.dry_run, args.loop)
        if args.command == "triton-repo":
            return _triton_repo(args)
        if args.command == "serve":
            _sweep_before_start(args.config)
        config = load_config(args.config)
        if args.command == "serve":
            _check_serve(config)
    except (ConfigError, StartupError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    configure_logging(config.logging.level, config.logging.format,
                      stream=sys.stdout if args.command == "serve" else sys.stderr)
    try:
        return _run(args, config)
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _triton_repo(args: argparse.Namespace) -> int:
    models_dir = load_config(args.config).inference.models_dir if args.config else Path(args.models_dir)
    written = write_repository(models_dir, Path(args.out), kind=args.kind, instances=max(1, args.instances),
                               execution_env=args.execution_env, names=args.model)
    for name in written:
        print(f"{name}: {Path(args.out) / name}")
    return EXIT_OK


def _sweep_before_start(path: str) -> None:
    """Retention first: what is due is shredded even when the node then refuses to start."""

    config, _ignored = load_sweep_config(path)  # the full check below reports every problem
    configure_logging(config.logging.level, config.logging.format, stream=sys.stdout)
    try:
        report, notes = sweep_once(config)
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"cannot use data_dir {config.node.data_dir} ({exc})") from exc
    if report.jobs or report.exports or report.orphans or report.keys or report.failed or report.failed_steps:
        structlog.get_logger("gateway.startup").info(
            "early_sweep_done", jobs=len(report.jobs), exports=len(report.exports), orphans=len(report.orphans),
            keys_destroyed=len(report.keys), failed=len(report.failed), notes=notes)


def _check_serve(config: GatewayConfig) -> None:
    """Every start-up check that needs no port: the master key (and that it is data_dir's), models, certificates."""

    master = MasterKey.load(config)
    database = Spool(config.node.data_dir).database_path
    if database.exists():
        jobs = JobStore(database)
        try:
            check_master_key(jobs, master.key_id)
        finally:
            jobs.close()
    check_route_models(config.inference.models_dir, config.routes)
    manifests = manifests_of(Predictors(config.inference).manifest)
    load_route_templates(config.inference.templates_dir, config.routes, manifests)
    check_certificates(config)


def _run(args: argparse.Namespace, config: GatewayConfig) -> int:
    if args.command == "serve":

        serve(config)
        return EXIT_OK
    if args.command == "status":
        return _status(config)
    if args.command == "complete":
        return _complete(config, args.job_id)
    if args.command == "audit":
        return _audit_verify(config)
    if args.command == "qa":
        return _qa(config, args.job_id, args.series, args.out)
    if args.command == "release":
        return _release(config, args.job_id)
    return _echo(config, args.destination)


if __name__ == "__main__":
    sys.exit(main())
