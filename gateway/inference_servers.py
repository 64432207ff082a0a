"""``[inference]`` settings of the inference farm: the Triton Inference Servers a node may send volumes to.

Every server is reached over gRPC with mutual TLS (the privacy notice promises TLS 1.2+ with mutual
authentication in transit): its certificate must chain to ``ca_file`` and carry ``server_name``, and the node
presents ``certificate_file``/``private_key_file``. A plain-text server is a configuration error, not a choice.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from gateway.destinations import ConfigPath
from gateway.routes import Name

__all__ = ["RemoteInference", "RemoteModel", "TritonServer"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TritonServer(_Model):
    """One Triton Inference Server (KServe v2 gRPC) of the pool."""

    name: Name
    #: ``host:port`` of its gRPC endpoint (Triton's ``--grpc-port``, 8001 by default).
    url: Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")]
    #: CA that signs the server's certificate.
    ca_file: ConfigPath
    #: The node's client certificate and key (the server's ``--grpc-use-ssl-mutual``).
    certificate_file: ConfigPath
    private_key_file: ConfigPath
    #: The name the server's certificate must carry; default: the host of ``url``.
    server_name: str | None = None

    @property
    def host(self) -> str:
        """The host part of ``url``."""
        return self.url.rsplit(":", 1)[0].strip("[]")

    @property
    def expected_name(self) -> str:
        """The name the server's certificate is checked against."""
        return self.server_name or self.host


class RemoteModel(_Model):
    """How one model's requests are made (``[inference.remote.models.<model>]``); what it leaves out is taken from
    ``[inference.remote]``."""

    #: Longest a server may take for one series before it counts as failed (and the series goes elsewhere).
    timeout_seconds: Annotated[float | None, Field(gt=0, le=7200)] = None
    #: Servers tried for one series before the stage waits for the pool (each at most once per try).
    attempts: Annotated[int | None, Field(ge=1, le=32)] = None


class RemoteInference(_Model):
    """The pool's behaviour (``[inference.remote]``)."""

    #: Defaults for every model; ``models.<name>`` overrides them per model package.
    timeout_seconds: Annotated[float, Field(gt=0, le=7200)] = 600.0
    attempts: Annotated[int, Field(ge=1, le=32)] = 3
    models: dict[str, RemoteModel] = Field(default_factory=dict)
    #: A server that failed is left alone this long, then probed (server and model ready) before it is used.
    down_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: With every server down, the series waits this long before it is tried again (until its deadline).
    wait_seconds: Annotated[float, Field(gt=0, le=3600)] = 15.0
    #: Longest a health probe or a model check may take.
    probe_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0

    def for_model(self, model: str) -> RemoteModel:
        """The settings of *model*: its own section's, completed from the defaults (every field set)."""
        own = self.models.get(model) or RemoteModel()
        return RemoteModel(timeout_seconds=own.timeout_seconds or self.timeout_seconds,
                           attempts=own.attempts or self.attempts)
