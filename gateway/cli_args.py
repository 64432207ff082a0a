"""The command line's grammar: the commands of ``python -m gateway`` and their arguments (run by
:mod:`gateway.__main__`)."""

from __future__ import annotations

import argparse

from gateway import __version__

__all__ = ["command_line"]


def command_line() -> argparse.ArgumentParser:
    """Every command of ``python -m gateway`` and its arguments."""
    parser = argparse.ArgumentParser(prog="contour-gateway",
                                     description="On-premises DICOM auto-contouring gateway for radiotherapy.")
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
    shred.add_argument("--loop", action="store_true",
                       help="sweep every retention.sweep_interval_seconds until stopped (a container's shredder)")
    keygen = commands.add_parser("keygen", help="create a new master key (the node never creates one itself)")
    target = keygen.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="key file to write: 32 random bytes, mode 0600 ([encryption] master_key_file)")
    target.add_argument("--env-file", help="environment file to write: CONTOUR_GW_MASTER_KEY=<base64>, mode 0600")
    qa = commands.add_parser("qa", help="print a job's contour QA record; --out writes a series' QA picture")
    qa.add_argument("--config", required=True)
    qa.add_argument("job_id")
    qa.add_argument("--series", type=int, default=1, help="the series number shown by status (default 1)")
    qa.add_argument("--out", help="PNG file to write (owner-only; routes with qa_picture = true): patient images, "
                    "no identifiers")
    repo = commands.add_parser("triton-repo", help="write a Triton model repository serving every model package")
    source = repo.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="take models_dir from this configuration")
    source.add_argument("--models-dir", help="folder of model packages")
    repo.add_argument("--out", required=True, help="repository folder to write (models in it are replaced)")
    repo.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance kind (default gpu)")
    repo.add_argument("--instances", type=int, default=1, help="instances per GPU (gpu) or in all (cpu)")
    repo.add_argument("--execution-env", help="Triton EXECUTION_ENV_PATH: a packed Python environment holding "
                      "contour-gateway, when the backend stub's own Python does not")
    repo.add_argument("--model", action="append", help="only this package (repeatable; default: all)")
    release = commands.add_parser("release", help="send the series of a job that contour QA held (after review)")
    release.add_argument("--config", required=True)
    release.add_argument("job_id")
    audit = commands.add_parser("audit", help="the audit trail")
    verify = audit.add_subparsers(dest="audit_command", required=True).add_parser(
        "verify", help="check the hash chain and every study's receipt-to-deletion age")
    verify.add_argument("--config", required=True)
    return parser
