"""Command line: ``python -m gateway {serve,status,complete,echo,shred,audit verify} --config FILE``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from gateway import __version__
from gateway.config import Destination, GatewayConfig, load_config
from gateway.errors import ConfigError, GatewayError, SendError
from gateway.logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contour-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the node in the foreground"),
                       ("status", "list jobs, their series, stage times and deliveries (no patient data)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", required=True)
    echo = commands.add_parser("echo", help="C-ECHO a configured destination")
    echo.add_argument("--config", required=True)
    echo.add_argument("destination", help="name of a [[destinations]] entry")
    complete = commands.add_parser("complete", help="force a receiving job to complete now")
    complete.add_argument("--config", required=True)
    complete.add_argument("job_id")
    shred = commands.add_parser("shred", help="run a retention sweep now and print what it deleted")
    shred.add_argument("--config", required=True)
    shred.add_argument("--dry-run", action="store_true", help="print what is due without deleting anything")
    qa = commands.add_parser("qa", help="write the QA picture of a job's series (routes with qa_picture = true)")
    qa.add_argument("--config", required=True)
    qa.add_argument("job_id")
    qa.add_argument("--series", type=int, default=1, help="the series number shown by status (default 1)")
    qa.add_argument("--out", required=True, help="PNG file to write (owner-only): patient images, no identifiers")
    audit = commands.add_parser("audit", help="the audit trail")
    verify = audit.add_subparsers(dest="audit_command", required=True).add_parser(
        "verify", help="check the hash chain and every study's receipt-to-deletion age")
    verify.add_argument("--config", required=True)
    return parser


def _shred(config: GatewayConfig, dry_run: bool) -> int:
    from gateway.audit import AuditLog
    from gateway.jobs import JobStore
    from gateway.retention import Shredder
    from gateway.spool import Spool

    spool = Spool(config.node.data_dir)
    spool.prepare()
    jobs = JobStore(spool.database_path)
    try:
        audit = AuditLog(spool.audit_path, syslog_address=config.audit.syslog_address)
        report = Shredder(spool, jobs, config.retention, audit).sweep(dry_run=dry_run)
    finally:
        jobs.close()
    verb = "due" if dry_run else "shredded"
    for job in report.jobs:
        print(f"{verb}: job {job.job_id} ({job.state}, {job.why}, {job.age_seconds / 3600:.1f} h old)")
    for export in report.exports:
        print(f"{verb}: export {export.destination}/{export.file_id} of job {export.job_id}")
    for orphan in report.orphans:
        print(f"{verb}: orphaned files of job {orphan}")
    print(f"{len(report.jobs)} job(s), {len(report.exports)} export(s), {len(report.orphans)} orphan(s) {verb}")
    return EXIT_OK


def _qa(config: GatewayConfig, job_id: str, series: int, out: str) -> int:
    import os

    from gateway.crypt import MasterKey, Sealer
    from gateway.jobs import JobStore
    from gateway.processing import StageContext, load_qa_picture
    from gateway.spool import Spool

    spool = Spool(config.node.data_dir)
    jobs = JobStore(spool.database_path)
    try:
        picture = load_qa_picture(StageContext(spool, jobs, Sealer(MasterKey.load(config), jobs)), job_id, series)
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


def _audit_verify(config: GatewayConfig) -> int:
    from gateway.audit import verify
    from gateway.spool import Spool

    path = Spool(config.node.data_dir).audit_path
    ceiling = config.retention.max_age_seconds
    result = verify(path, ceiling, time.time())
    for job in result.jobs.values():
        age = job.age(time.time())
        held = "deleted" if job.deleted_at is not None else "HELD"
        verdict = "OVER CEILING" if job.job_id in result.over_ceiling else "ok"
        print(f"{job.job_id}  study {job.study or '-'}  {held} after "
              f"{'-' if age is None else f'{age / 3600:.2f} h'}  {verdict}")
    for number in result.broken_links:
        print(f"chain broken at line {number}", file=sys.stderr)
    print(f"{result.records} record(s), {len(result.jobs)} job(s), ceiling {ceiling} s: "
          f"{'OK' if result.ok else 'FAILED'}")
    return EXIT_OK if result.ok else EXIT_FAILURE


def _status(config: GatewayConfig) -> int:
    from gateway.jobs import JobStore
    from gateway.spool import Spool
    from gateway.status import status_lines

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
    from gateway.assembly import force_complete
    from gateway.jobs import JobStore
    from gateway.spool import Spool

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
    from gateway.send import Sender

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
    args = _parser().parse_args(argv)
    if sys.flags.optimize:
        print("error: run without -O or PYTHONOPTIMIZE: pynetdicom checks received PDUs with assert statements",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args.config)
        if args.command == "serve":
            from gateway.models import check_route_models
            from gateway.tls import check_certificates

            check_route_models(config.inference.models_dir, config.routes)
            check_certificates(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.logging.level, config.logging.format,
                      stream=sys.stdout if args.command == "serve" else sys.stderr)
    try:
        if args.command == "serve":
            from gateway.service import serve

            serve(config)
            return EXIT_OK
        if args.command == "status":
            return _status(config)
        if args.command == "complete":
            return _complete(config, args.job_id)
        if args.command == "shred":
            return _shred(config, args.dry_run)
        if args.command == "audit":
            return _audit_verify(config)
        if args.command == "qa":
            return _qa(config, args.job_id, args.series, args.out)
        return _echo(config, args.destination)
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
