"""Real Triton Inference Servers for the farm tests (a plugin of tests/conftest.py: its fixtures farm_pki and
farm_repository are everyone's): NVIDIA's tritonserver (nvidia-pytriton, in .venv-triton) on
loopback with mutual TLS, serving the repository ``python -m gateway triton-repo`` writes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as triton

from gateway.inference.triton_repo import write_repository
from tests.conftest import REPO, free_port, load_script, toml_value
from tests.pki import PKI, Pair, make_pki

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


def served(server: Any, pki: PKI, model: str = "default", *, at_least: int = 0, wait: float = 10.0) -> int:
    """Requests *server* answered successfully for *model*, from its own statistics (gRPC, with the node's
    certificate); waits up to *wait* seconds for *at_least* (a server counts a request just after replying)."""
    client = triton.InferenceServerClient(server.url, ssl=True, root_certificates=str(pki.ca),
                                          private_key=str(pki.client.key),
                                          certificate_chain=str(pki.client.certificate),
                                          channel_args=[("grpc.ssl_target_name_override", "localhost")])
    deadline = time.monotonic() + wait
    try:
        while True:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
            count = int(stats.get("success", {}).get("count", 0))
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="module")
def farm_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, the servers' and the node's certificates, and the untrusted kinds."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def farm_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CPU repository of the default model."""
    return write_repo(tmp_path_factory.mktemp("repo") / "models")
