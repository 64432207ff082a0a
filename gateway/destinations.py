"""Destinations: where results go (``[[destinations]]``): a DICOM node by C-STORE, or a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, model_validator

from gateway.routes import Name

__all__ = ["DESTINATION_TYPES", "AETitle", "AnyDestination", "ConfigPath", "Destination", "DestinationTLS",
           "FolderDestination", "Port", "Retry", "check_ae_title"]


def check_ae_title(value: str) -> str:
    """PS3.5 6.2: AE is 1-16 characters of the default repertoire, no backslash or controls."""
    if not 1 <= len(value) <= 16:
        raise ValueError("must be 1 to 16 characters")
    if not value.strip(" "):
        raise ValueError("must not be only spaces")
    if value != value.strip(" "):
        raise ValueError("must not start or end with a space")
    if value == "*":
        raise ValueError("'*' (any AE title) is allowed only in [[peers]]")
    if any(ch == "\\" or not (0x20 <= ord(ch) < 0x7F) for ch in value):
        raise ValueError("may contain only printable ASCII characters and no backslash")
    return value


AETitle = Annotated[str, AfterValidator(check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return (base / value).resolve() if base is not None and not value.is_absolute() else value


#: A path in the configuration: relative ones are relative to the configuration file's folder.
ConfigPath = Annotated[Path, AfterValidator(_resolve)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Retry(_Model):
    """Retry policy for transient send failures: exponential backoff, then dead letter."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 6
    initial_backoff_seconds: Annotated[float, Field(ge=0, le=3600)] = 2.0
    max_backoff_seconds: Annotated[float, Field(ge=0, le=86_400)] = 300.0
    multiplier: Annotated[float, Field(ge=1, le=10)] = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number *attempt* (1-based)."""
        return float(min(self.max_backoff_seconds, self.initial_backoff_seconds * self.multiplier ** (attempt - 1)))


class DestinationTLS(_Model):
    """DICOM TLS to a destination: its certificate must chain to ``ca_file`` and name ``server_name``."""

    ca_file: ConfigPath
    certificate_file: ConfigPath | None = None  # our client certificate, if the destination asks for one
    private_key_file: ConfigPath | None = None
    server_name: str | None = None  # the name its certificate must carry; default: the destination's host

    @model_validator(mode="after")
    def _key_with_certificate(self) -> DestinationTLS:
        if (self.certificate_file is None) != (self.private_key_file is None):
            raise ValueError("certificate_file and private_key_file go together")
        return self


class Destination(_Model):
    """Where results go by C-STORE (a TPS, a PACS)."""

    type: Literal["dicom"] = "dicom"
    name: Name
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = None  # defaults to node.ae_title
    connect_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    acse_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 120.0
    retry: Retry = Retry()
    tls: DestinationTLS | None = None


class FolderDestination(_Model):
    """Results written as DICOM files into ``<data_dir>/export/<name>/``, shredded with the study.

    For a node without a TPS yet, or a TPS that imports from a folder; the files are the one
    plaintext copy the node makes (owner-only, random file names), and retention deletes them.
    """

    type: Literal["folder"]
    name: Name
    retry: Retry = Retry()


def _destination_type(value: Any) -> str:
    kind = value.get("type", "dicom") if isinstance(value, dict) else getattr(value, "type", "dicom")
    return str(kind)


DESTINATION_TYPES = ("dicom", "folder")
AnyDestination = Annotated[
    Annotated[Destination, Tag("dicom")] | Annotated[FolderDestination, Tag("folder")],
    Discriminator(_destination_type),
]
