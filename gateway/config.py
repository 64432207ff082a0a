"""Configuration: the TOML file, validated once at start-up into frozen models.

Every problem in a file is reported at once, as ``key.path: reason`` lines in a single
:class:`~gateway.errors.ConfigError`; ``python -m gateway`` turns that into exit code 2.
Relative paths are resolved against the folder that holds the configuration file.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.destinations import (
    DESTINATION_TYPES,
    AETitle,
    AnyDestination,
    ConfigPath,
    Destination,
    FolderDestination,
    Retry,
    check_ae_title,
)
from gateway.errors import ConfigError
from gateway.inference_servers import RemoteInference, TritonServer
from gateway.limits import Limits
from gateway.routes import Name, Route, StructureTemplate

__all__ = [
    "MAX_AGE_CEILING_SECONDS",
    "AnyDestination",
    "Audit",
    "Destination",
    "Encryption",
    "FolderDestination",
    "GatewayConfig",
    "Inference",
    "ListenerTLS",
    "Logging",
    "MetricsEndpoint",
    "Node",
    "Peer",
    "Pipeline",
    "Retention",
    "Retry",
    "Route",
    "StructureTemplate",
    "load_config",
    "load_sweep_config",
]

#: The privacy promise: no patient data is kept longer than 24 hours.
MAX_AGE_CEILING_SECONDS = 86_400



def _check_host(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("must be an IP address or a CIDR network such as 10.0.0.0/24") from None
    return value


HostOrNetwork = Annotated[str, AfterValidator(_check_host)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerTLS(_Model):
    """DICOM TLS on the listener (PS3.15 B.1, BCP 195): its own port, optional mutual authentication."""

    port: Annotated[int, Field(ge=0, le=65535)] = 2762  # the registered DICOM TLS port; 0 = any free one
    certificate_file: ConfigPath
    private_key_file: ConfigPath
    #: CA that signs the peers' client certificates (required when they must present one).
    ca_file: ConfigPath | None = None
    require_client_certificate: bool = True
    #: A TLS handshake must complete within this; it runs in the connection's own thread.
    handshake_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0

    @model_validator(mode="after")
    def _ca_for_clients(self) -> Self:
        if self.require_client_certificate and self.ca_file is None:
            raise ValueError("require_client_certificate needs ca_file, the CA of the peers' certificates")
        return self


class Node(_Model):
    """This gateway's own DICOM node: where it listens and where it keeps its state."""

    ae_title: AETitle = "CONTOUR_GW"
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112  # 0 = pick a free port (tests)
    data_dir: ConfigPath = Path("var")
    max_associations: Annotated[int, Field(ge=1, le=256)] = 8
    #: Largest P-DATA PDU we accept; 128 KiB is dcmtk's largest and measurably faster than 16 KiB.
    max_pdu_size: Annotated[int, Field(ge=4096, le=4 * 1024 * 1024)] = 131_072
    #: Receiver processes; pynetdicom is CPU-bound under the GIL, so parallel associations need processes.
    #: Each waits on disk as much as on CPU, so 4 pays off on 2 CPUs too (measured with 4 senders).
    receive_workers: Annotated[int, Field(ge=1, le=32)] = 4
    acse_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    network_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    completion_check_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    #: Connections not (yet) associated, beyond which new ones are closed at once.
    max_pending_connections: Annotated[int, Field(ge=1, le=4096)] = 256
    #: From connecting to a complete A-ASSOCIATE-RQ, and from a PDU's first byte to its last.
    association_request_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    pdu_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: Below this much free space in data_dir, associations are refused (transient) and C-STORE answers 0xA700.
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024
    #: DICOM TLS listener; ``plain = false`` leaves it the only way in.
    tls: ListenerTLS | None = None
    plain: bool = True

    @model_validator(mode="after")
    def _something_to_listen_on(self) -> Self:
        if not self.plain and self.tls is None:
            raise ValueError("plain = false needs [node.tls]: the node would not listen at all")
        return self

    @field_validator("bind")
    @classmethod
    def _bind_is_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be an IP address to listen on, such as 127.0.0.1 or 0.0.0.0") from None
        return value


class Peer(_Model):
    """A sender allowed to store studies here: calling AE title and source address must both match
    (and, with ``certificate_name``, its TLS client certificate)."""

    name: Name
    ae_title: str
    host: HostOrNetwork
    quiet_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    #: Subject CN, or a DNS, URI or e-mail subjectAltName, that the peer's TLS client certificate must carry;
    #: set, the peer is accepted only over DICOM TLS with such a certificate (needs mutual TLS on the listener).
    certificate_name: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae_or_wildcard(cls, value: str) -> str:
        return value if value == "*" else check_ae_title(value)

    def admits(self, calling_ae: str, address: str) -> bool:
        """Return whether this peer entry covers *calling_ae* connecting from *address*."""
        if self.ae_title != "*" and calling_ae.strip() != self.ae_title:
            return False
        return _address_in(address, self.host)


class Pipeline(_Model):
    """How completed studies are processed."""

    #: Jobs processed at once, off the receiving processes; inference uses every core on its own.
    workers: Annotated[int, Field(ge=1, le=16)] = 1
    #: How often the job table is checked for work that is due (deliveries to retry, restarts).
    poll_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    #: Memory (MiB) for studies read and pseudonymised while they still arrive, ahead of the pseudonymise
    #: stage; 0 turns it off. What does not fit is pseudonymised by the stage as usual.
    prepare_mb: Annotated[int, Field(ge=0, le=65536)] = 256


class Retention(_Model):
    """How long patient data may stay; the ceiling is the 24 h promise."""

    max_age_seconds: Annotated[int, Field(ge=60, le=MAX_AGE_CEILING_SECONDS)] = MAX_AGE_CEILING_SECONDS
    sweep_interval_seconds: Annotated[int, Field(ge=1, le=3600)] = 300
    #: After the TPS confirmed a study's results, keep its data this long (0: shred at once).
    keep_after_delivery_seconds: Annotated[int, Field(ge=0, le=MAX_AGE_CEILING_SECONDS)] = 0

    @model_validator(mode="after")
    def _sweep_fits(self) -> Self:
        if self.sweep_interval_seconds >= self.max_age_seconds:
            raise ValueError("sweep_interval_seconds must be smaller than max_age_seconds")
        if self.keep_after_delivery_seconds >= self.max_age_seconds:
            raise ValueError("keep_after_delivery_seconds must be smaller than max_age_seconds")
        return self


class Audit(_Model):
    """The audit trail (``<data_dir>/audit/audit.jsonl``, always written) and its optional syslog copy."""

    #: ``/dev/log`` (local syslog socket) or ``host:port`` (UDP); unset: no syslog copy.
    syslog_address: str | None = None

    @field_validator("syslog_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value.startswith("/"):
            return value
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be a socket path such as /dev/log, or host:port")
        return value


class Encryption(_Model):
    """Where the keys are: the master key (environment variable if set, else key file) and the key directory.

    Nothing here is created implicitly except ``key_dir`` itself: make the master key with
    ``python -m gateway keygen``. Both must lie outside ``data_dir``, so that a copy of it alone is
    unreadable, and ``key_dir`` must stay out of backups (see docs/privacy.md).
    """

    #: Key file (32 raw bytes, mode 0600), made by ``python -m gateway keygen --out FILE``.
    master_key_file: ConfigPath | None = None
    master_key_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] = "CONTOUR_GW_MASTER_KEY"
    #: Hourly key-encryption keys (written by the node, destroyed by retention); default: the key file's folder.
    key_dir: ConfigPath | None = None
    #: Allow the key file or key_dir inside data_dir (a copy of data_dir then decrypts itself: tests only).
    allow_keys_in_data_dir: bool = False


_Provider = Literal["CUDAExecutionProvider", "CPUExecutionProvider"]
_CPU: _Provider = "CPUExecutionProvider"


class Inference(_Model):
    """How models run: where their packages are, and on what."""

    #: Folder holding the model packages that ``[[routes]] model`` names.
    models_dir: ConfigPath = Path("models")
    #: Folder holding the site templates that ``[[routes]] template`` names (``<name>.toml``).
    templates_dir: ConfigPath = Field(default=Path("templates"), validate_default=True)  # beside the config file
    #: onnxruntime execution providers in order of preference; unavailable ones are skipped.
    providers: Annotated[list[_Provider], Field(min_length=1)] = Field(default_factory=lambda: [_CPU])
    #: Threads per inference session; 0 lets onnxruntime choose.
    threads: Annotated[int, Field(ge=0, le=256)] = 0
    #: CUDA: allow TF32 convolutions (some 20 % faster; probabilities differ from float32 by up to ~3e-3).
    cuda_tf32: bool = False
    #: ``local``: models run in this process; ``triton``: on the Triton Inference Servers of ``servers``, which
    #: receive the HU volume and its voxel axes only (no DICOM, no UID, no pseudonym) and return the masks.
    backend: Literal["local", "triton"] = "local"
    servers: list[TritonServer] = Field(default_factory=list)
    remote: RemoteInference = RemoteInference()

    @model_validator(mode="after")
    def _servers_for_triton(self) -> Self:
        names = [server.name for server in self.servers]
        problems = [f"servers: name {name!r} is used more than once" for name in sorted(set(names))
                    if names.count(name) > 1]
        if self.backend == "triton" and not self.servers:
            problems.append("backend 'triton' needs at least one [[inference.servers]]")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class MetricsEndpoint(_Model):
    """Prometheus ``/metrics`` and ``/healthz`` over HTTP; keep it on localhost or a management network."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464  # 0 = any free port (tests)


class Logging(_Model):
    """Log output: JSON lines on stdout (``console`` is for a person at a terminal)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class GatewayConfig(_Model):
    """The whole validated configuration; built only by :func:`load_config` or in tests."""

    node: Node = Node()
    peers: list[Peer] = Field(default_factory=list)
    destinations: list[AnyDestination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    pipeline: Pipeline = Pipeline()
    limits: Limits = Limits()
    retention: Retention = Retention()
    audit: Audit = Audit()
    encryption: Encryption = Encryption()
    inference: Inference = Inference()
    metrics: MetricsEndpoint = MetricsEndpoint()
    logging: Logging = Logging()

    @model_validator(mode="after")
    def _references_resolve(self) -> Self:
        problems = []
        for field in ("peers", "destinations", "routes"):
            names = [item.name for item in getattr(self, field)]
            for dup in sorted({n for n in names if names.count(n) > 1}):
                problems.append(f"{field}: name {dup!r} is used more than once")
        known = {d.name for d in self.destinations}
        for i, route in enumerate(self.routes):
            for dest in route.destinations:
                if dest not in known:
                    problems.append(f"routes[{i}].destinations: {dest!r} is not a configured destination")
        problems += _certificate_name_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def destination(self, name: str) -> Destination | FolderDestination:
        """Return the destination called *name*."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"no destination named {name!r}")

    def peer_for(self, calling_ae: str, address: str) -> Peer | None:
        """Return the first peer entry admitting *calling_ae* from *address*, if any."""
        return next((p for p in self.peers if p.admits(calling_ae, address)), None)

    def address_allowed(self, address: str) -> bool:
        """Return whether any peer may connect from *address* (checked before any PDU is read)."""
        return any(_address_in(address, p.host) for p in self.peers)


def _certificate_name_problems(config: GatewayConfig) -> list[str]:
    tls = config.node.tls
    if tls is not None and tls.require_client_certificate:
        return []
    return [f"peers[{i}].certificate_name: needs [node.tls] with require_client_certificate = true"
            for i, peer in enumerate(config.peers) if peer.certificate_name is not None]


def _address_in(address: str, network: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
        net = ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version == net.version and ip in net


def _format_location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith(("function-after", "function-before", "constrained")):
            continue
        elif loc[0] == "destinations" and index == 2 and part in DESTINATION_TYPES:
            continue  # the union's tag: the entry's own ``type``
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{_format_location(tuple(err['loc']))}: {message}")
    return lines


def parse_config(raw: Mapping[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> GatewayConfig:
    """Validate an already-parsed mapping; relative paths are resolved against *base_dir* (if given)."""
    try:
        return GatewayConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file ({exc.strerror})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate the TOML file at *path*.

    Raises
    ------
    ConfigError
        If the file is missing, is not TOML, or breaks any rule; all problems are listed.
    """
    path = Path(path)
    return parse_config(_read_toml(path), source=str(path), base_dir=path.resolve().parent)


#: What a retention sweep needs: where the data is, where the keys are, how long data may stay, the audit trail.
_SWEEP_SECTIONS = ("encryption", "retention", "audit")


def load_sweep_config(path: str | os.PathLike[str]) -> tuple[GatewayConfig, list[str]]:
    """The configuration a retention sweep needs, and the problems elsewhere in the file it ignored.

    Only ``node.data_dir`` and the ``[encryption]``, ``[retention]`` and ``[audit]`` sections count;
    the rest of the file may be invalid (an expired certificate, a missing model, a typo), so that
    retention never depends on the node being able to start.

    Raises
    ------
    ConfigError
        If the file cannot be read, or the sections a sweep needs are themselves invalid.
    """
    path = Path(path)
    raw = _read_toml(path)
    base_dir = path.resolve().parent
    try:
        return parse_config(raw, source=str(path), base_dir=base_dir), []
    except ConfigError as exc:
        ignored = exc.problems
    reduced: dict[str, Any] = {name: raw[name] for name in _SWEEP_SECTIONS if name in raw}
    node = raw.get("node")
    if isinstance(node, Mapping) and "data_dir" in node:
        reduced["node"] = {"data_dir": node["data_dir"]}
    return parse_config(reduced, source=str(path), base_dir=base_dir), ignored
