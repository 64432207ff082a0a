"""Real Triton Inference Servers for the farm tests: NVIDIA's tritonserver (nvidia-pytriton, in .venv-triton) on
loopback with mutual TLS, serving the repository ``python -m gateway triton-repo`` writes."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

from gateway.inference.triton_repo import write_repository
from tests.conftest import REPO, free_port, load_script, toml_value
from tests.pki import PKI, Pair

triton_local = load_script("triton_local")
TritonProcess = triton_local.TritonProcess


def write_repo(folder: Path, models_dir: Path = REPO / "models", names: tuple[str, ...] = ("default",)) -> Path:
    """A CPU model repository of *names* from *models_dir*."""
    write_repository(models_dir, folder, kind="cpu", names=list(names))
    return folder


def start_server(repository: Path, folder: Path, pki: PKI, *, certificate: Pair | None = None,
                 env: dict[str, str] | None = None, grpc_port: int | None = None) -> Any:
    """A tritonserver on a free loopback port (or *grpc_port*), presenting *certificate* (default: the PKI's
    server certificate), requiring clients signed by the PKI's CA."""
    pair = certificate or pki.server
    return triton_local.start(repository, folder, grpc_port=grpc_port or free_port(), metrics_port=free_port(),
                              certificate=pair.certificate, key=pair.key, ca=pki.ca, env=env)


def server_entry(name: str, url: str, pki: PKI, *, client: Pair | None = None, ca: Path | None = None,
                 server_name: str = "localhost") -> dict[str, Any]:
    """An ``[[inference.servers]]`` entry."""
    pair = client or pki.client
    return {"name": name, "url": url, "ca_file": str(ca or pki.ca), "certificate_file": str(pair.certificate),
            "private_key_file": str(pair.key), "server_name": server_name}


def inference_toml(servers: list[dict[str, Any]], **remote: Any) -> str:
    """The keys and tables of ``[inference]`` for ``backend = "triton"`` (write_config's *extra_inference*)."""
    lines = ['backend = "triton"', ""]
    if remote:
        lines += ["[inference.remote]", *(f"{key} = {toml_value(value)}" for key, value in remote.items()), ""]
    for entry in servers:
        lines += ["[[inference.servers]]", *(f"{key} = {toml_value(value)}" for key, value in entry.items()), ""]
    return "\n".join(lines)


def served(server: Any, model: str = "default") -> int:
    """Requests *server* answered successfully for *model*, from its own Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf'^nv_inference_request_success{{model="{model}",version="1"}} (\d+)', text, re.MULTILINE)
    return int(found.group(1)) if found else 0
