"""The inference farm: a pool of Triton Inference Servers, each reached over gRPC with mutual TLS.

Scheduling: each series goes to the healthy server with the fewest requests outstanding (ties: the one that has
served fewest), so two servers share a stream of studies and a slow one gets less. A server that refuses, times
out, fails its TLS handshake or dies mid-request is marked down for ``down_seconds`` and the series is tried on
another (up to ``attempts`` servers); once its time is up it is probed (server live, model ready, model identical
to the node's package) before it gets work again. When no server can take a series,
:class:`~gateway.errors.InferenceUnavailable` tells the stage to wait: the runner tries the series again after
``wait_seconds``, until retention shreds the study at its deadline.

A failure the model reports on purpose (a volume it refuses, a model that fails on it) is the series' own and is
raised as :class:`~gateway.errors.VolumeError` / :class:`~gateway.errors.InferenceError`: trying it on every server
would fail the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
import structlog
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from gateway.config import Inference
from gateway.errors import InferenceUnavailable, StartupError
from gateway.inference.wire import RESULT, raise_remote
from gateway.inference_servers import TritonServer

__all__ = ["FarmObserver", "TritonFarm"]

log = structlog.get_logger(__name__)

_MAX_MESSAGE = 2**31 - 1  # gRPC's limit; a 512x512x1000 int16 volume is 0.5 GB


class FarmObserver(Protocol):
    """Where the farm reports (the node's metrics)."""

    def inference_request(self, server: str, outcome: str, seconds: float) -> None: ...

    def inference_server_up(self, server: str, up: bool) -> None: ...


class _ServerFailure(Exception):
    """The server, not the series, failed: try another."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Server:
    settings: TritonServer
    client: triton.InferenceServerClient
    outstanding: int = 0
    served: int = 0
    down_until: float = 0.0
    #: Models the server holds exactly as the node's packages (checked when first used).
    verified: set[str] = field(default_factory=set)
    #: Models it holds in another version, with when to ask again (after a repository update and restart).
    differs_until: dict[str, float] = field(default_factory=dict)
    probed: bool = False

    @property
    def name(self) -> str:
        return self.settings.name


class TritonFarm:
    """Sends series to the pool; safe to share between the pipeline's worker threads."""

    def __init__(self, inference: Inference, observer: FarmObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = inference.remote
        self._observer = observer
        self._clock = clock
        self._lock = threading.Lock()
        self._servers = [_Server(server, _client(server)) for server in inference.servers]

    def infer(self, model: str, digest: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The reply of the first server that answers for *model* (whose package digest must be *digest*).

        Raises
        ------
        InferenceUnavailable
            When no server could answer (all down, refusing, failing, or holding another model).
        VolumeError, InferenceError
            When the model refused the volume or failed on it (the series' own failure).
        """
        settings = self._settings.for_model(model)
        attempts, timeout = settings.attempts or 1, settings.timeout_seconds
        tried: set[str] = set()
        for _ in range(attempts):
            server = self._pick(model, digest, tried)
            if server is None:
                break
            tried.add(server.name)
            try:
                return self._call(server, model, arrays, timeout)
            except _ServerFailure as failure:
                self._mark_down(server, failure.reason)
        log.warning("inference_unavailable", model=model, servers_tried=len(tried))
        raise InferenceUnavailable(f"no inference server answered for model {model} ({len(tried)} tried)")

    def pool(self) -> dict[str, str]:
        """Each server's state: ``up``, ``down`` or ``unchecked`` (not used yet)."""
        now = self._clock()
        with self._lock:
            return {s.name: "down" if s.down_until > now else "up" if s.probed else "unchecked"
                    for s in self._servers}

    def healthy(self) -> bool:
        """Whether any server is usable: each one not known up (never used, or down and due for a probe) is asked
        first whether it is ready (``/healthz`` calls this: a pool that is unreachable shows before any study)."""
        now = self._clock()
        with self._lock:
            due = [s for s in self._servers if not s.probed and s.down_until <= now]
        for server in due:
            self._renew(server)
            try:
                ready = bool(server.client.is_server_ready(client_timeout=self._settings.probe_seconds))
            except InferenceServerException as exc:
                self._mark_down(server, _reason(exc))
                continue
            if not ready:
                self._mark_down(server, "server_not_ready")
                continue
            with self._lock:
                server.probed = True  # its models are still checked before it gets a series
            if self._observer is not None:
                self._observer.inference_server_up(server.name, True)
        return any(state == "up" for state in self.pool().values())

    def close(self) -> None:
        """Close every connection."""
        for server in self._servers:
            server.client.close()

    def _pick(self, model: str, digest: str, tried: set[str]) -> _Server | None:
        while True:
            now = self._clock()
            with self._lock:
                candidates = [s for s in self._servers if s.name not in tried and s.down_until <= now]
                if not candidates:
                    return None
                server = min(candidates, key=lambda s: (s.outstanding, s.served))
                if server.probed and model in server.verified:
                    server.outstanding += 1
                    return server
                differs = server.probed and server.differs_until.get(model, 0.0) > now
            if differs:  # holds another version of the model: not for this model, maybe for others
                tried.add(server.name)
                continue
            try:
                self._probe(server, model, digest)
            except _ServerFailure as failure:
                tried.add(server.name)
                self._mark_down(server, failure.reason)

    def _probe(self, server: _Server, model: str, digest: str) -> None:
        timeout = self._settings.probe_seconds
        self._renew(server)
        try:
            if not server.client.is_model_ready(model, client_timeout=timeout):
                raise _ServerFailure("model_not_ready")
            config = server.client.get_model_config(model, as_json=True, client_timeout=timeout)
        except InferenceServerException as exc:
            raise _ServerFailure(_reason(exc)) from None
        served = config.get("config", {}).get("parameters", {}).get("package_sha256", {}).get("string_value")
        with self._lock:
            server.probed = True
            if served == digest:
                server.verified.add(model)
                server.differs_until.pop(model, None)
            else:
                server.differs_until[model] = self._clock() + self._settings.down_seconds
        if self._observer is not None:
            self._observer.inference_server_up(server.name, True)
        if served != digest:
            log.error("alert", stage="infer", outcome="refused", reason="inference_server_model_differs",
                      server=server.name, model=model)

    def _renew(self, server: _Server) -> None:
        """A new channel to a server that was down: the old one may still be backing off from the failure."""
        with self._lock:
            if not server.down_until:
                return
            old, server.client, server.down_until = server.client, _client(server.settings), 0.0
        old.close()

    def _call(self, server: _Server, model: str, arrays: Mapping[str, np.ndarray],
              timeout: float | None) -> np.ndarray:
        started = time.monotonic()
        outcome = "failed"
        try:
            inputs = [_input(name, array) for name, array in arrays.items()]
            reply = server.client.infer(model, inputs, outputs=[triton.InferRequestedOutput(RESULT)],
                                        client_timeout=timeout)
            result: np.ndarray | None = reply.as_numpy(RESULT)
            if result is None:
                raise _ServerFailure("reply_without_result")
            outcome = "ok"
            return result
        except InferenceServerException as exc:
            raise_remote(exc.message() or "")  # the model's own refusal: the series', not the server's
            raise _ServerFailure(_reason(exc)) from None
        finally:
            seconds = time.monotonic() - started
            with self._lock:
                server.outstanding -= 1
                server.served += 1
            if self._observer is not None:
                self._observer.inference_request(server.name, outcome, seconds)
            log.info("inference_request", server=server.name, model=model, outcome=outcome,
                     seconds=round(seconds, 2))

    def _mark_down(self, server: _Server, reason: str) -> None:
        with self._lock:
            server.down_until = self._clock() + self._settings.down_seconds
            server.probed = False
            server.verified.clear()
            server.differs_until.clear()
        log.warning("inference_server_down", server=server.name, reason=reason,
                    retry_in_seconds=self._settings.down_seconds)
        if self._observer is not None:
            self._observer.inference_server_up(server.name, False)


def _input(name: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), _DATATYPES[array.dtype.str.lstrip("<>=|")])
    tensor.set_data_from_numpy(array)
    return tensor


_DATATYPES = {"i2": "INT16", "f4": "FP32", "f8": "FP64", "i8": "INT64"}


def _reason(exc: InferenceServerException) -> str:
    """A short code for a gRPC failure (``unavailable``, ``deadline_exceeded``, ...): no message text, which may
    quote addresses and certificates."""
    status = exc.status() or ""
    return status.removeprefix("StatusCode.").lower() or "server_error"


def _client(server: TritonServer) -> triton.InferenceServerClient:
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=server.ca_file.read_bytes(),
                                                   private_key=server.private_key_file.read_bytes(),
                                                   certificate_chain=server.certificate_file.read_bytes())
    except OSError as exc:
        raise StartupError(f"inference server {server.name}: cannot read its TLS files ({exc.strerror})") from exc
    options = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE),
               ("grpc.ssl_target_name_override", server.expected_name), ("grpc.enable_retries", 0)]
    return triton.InferenceServerClient(server.url, creds=credentials, channel_args=options)
