"""Command line: ``python -m gateway {serve,echo,status,complete} --config FILE``."""

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
    return parser


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
    try:
        config = load_config(args.config)
        if args.command == "serve":
            from gateway.manifest import check_route_models

            check_route_models(config.inference.models_dir, config.routes)
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
        return _echo(config, args.destination)
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
