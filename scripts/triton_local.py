#!/usr/bin/env python3
"""Start a real Triton Inference Server on this machine (CPU), for the tests, the benchmarks and a first try.

NVIDIA's ``tritonserver`` binary and its Python backend come from the ``nvidia-pytriton`` wheel, installed in
``.venv-triton`` (a venv made from Debian's ``/usr/bin/python3.11``, which the backend stub links; ``make`` makes
it). The server speaks gRPC with mutual TLS on loopback only; HTTP is off, metrics on loopback.

    .venv-triton/bin/python scripts/triton_local.py --repository REPO --grpc-port 8001 \\
        --certificate server.pem --key server.key --ca ca.pem

A site serves the same repository (``python -m gateway triton-repo``) with NVIDIA's Triton image: deploy/triton/.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-triton"


#: Where the Python backend keeps its shared-memory regions (one per model instance, 256 MiB here).
SHARED_MEMORY = Path("/dev/shm")


@dataclass
class TritonProcess:
    """A running ``tritonserver``; :meth:`stop` or :meth:`kill` ends it and removes its shared memory."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log: Path
    shm_prefix: str  # names of its Python backend's shared-memory regions start with this

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """``kill -9``: the server dies mid-request, as a crashed machine would."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.remove_shared_memory()

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.remove_shared_memory()

    def remove_shared_memory(self) -> None:
        """Unlink the regions its backend stubs left (a killed server, or stubs ended before the server: each
        would otherwise hold 256 MiB of memory until the machine restarts)."""
        for region in SHARED_MEMORY.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)


def _site_packages() -> Path:
    found = sorted(VENV.glob("lib/python3*/site-packages"))
    if not found or not (found[0] / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"no tritonserver in {VENV}: run 'make dev' (it installs .[triton-server] there)")
    return found[0]


def backend_directory(folder: Path) -> Path:
    """Triton's backends folder with the Python backend and the stub for Python 3.11 (as pytriton lays it out)."""
    home = _site_packages() / "pytriton" / "tritonserver"
    target = folder / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (home / "backends" / "python" / "libtriton_python.so",
                   home / "backends" / "python" / "triton_python_backend_utils.py",
                   home / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"):
        if not (target / source.name).exists():
            shutil.copy2(source, target / source.name)
    return folder / "backends"


def start(repository: Path, folder: Path, *, grpc_port: int, metrics_port: int, certificate: Path, key: Path,
          ca: Path, env: dict[str, str] | None = None, wait_seconds: float = 90.0) -> TritonProcess:
    """Start ``tritonserver`` on *repository* and wait until every model is ready (or raise with its log)."""
    site = _site_packages()
    binary = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"tritonserver-{grpc_port}.log"
    shm_prefix = f"contour_gateway_triton_{secrets.token_hex(6)}_"
    environment = {**os.environ, "VIRTUAL_ENV": str(VENV), "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
                   "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"), **(env or {})}
    environment.pop("PYTHONHOME", None)
    command = [str(binary), f"--model-repository={repository}", f"--backend-directory={backend_directory(folder)}",
               "--allow-http=false", "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
               "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}", "--allow-gpu-metrics=false",
               "--grpc-use-ssl-mutual=true", f"--grpc-server-cert={certificate}", f"--grpc-server-key={key}",
               f"--grpc-root-cert={ca}", "--exit-timeout-secs=5", "--strict-readiness=true",
               # A CT volume (50-500 MB) passes through the Python backend's shared memory: one region that fits
               # it, rather than the default 1 MB grown 1 MB at a time.
               "--backend-config=python,shm-default-byte-size=268435456",
               "--backend-config=python,shm-growth-byte-size=134217728",
               f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]
    with log.open("wb") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
    server = TritonProcess(process, grpc_port, metrics_port, log, shm_prefix)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Started GRPCInferenceService" in text:
            return server
        if not server.alive():
            break
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"tritonserver did not start; its log:\n{log.read_text(errors='replace')[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--certificate", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    parser.add_argument("--ca", required=True, type=Path, help="CA of the clients' certificates")
    parser.add_argument("--work", type=Path, default=Path(".triton"), help="backends folder and log")
    args = parser.parse_args()
    server = start(args.repository.resolve(), args.work.resolve(), grpc_port=args.grpc_port,
                   metrics_port=args.metrics_port, certificate=args.certificate.resolve(), key=args.key.resolve(),
                   ca=args.ca.resolve())
    print(f"tritonserver on {server.url} (log {server.log}); Ctrl-C stops it", flush=True)
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        server.stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
