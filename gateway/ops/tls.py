"""DICOM TLS (PS3.15 Annex B, BCP 195 profile): server and client contexts, certificate checks at start-up,
and the names a peer's client certificate carries.

TLS 1.2 or 1.3 only, forward-secret AEAD cipher suites only (ECDHE/DHE with AES-GCM or
ChaCha20-Poly1305), no compression, no renegotiation. The listener can require a client
certificate signed by the configured CA (mutual authentication); the SCU always verifies the
destination's certificate against its CA and checks the host name.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.config import GatewayConfig
from gateway.errors import ConfigError

__all__ = ["CIPHERS", "ClientCertificate", "certificate_problems", "check_certificates", "client_certificate",
           "client_context", "server_context"]

#: BCP 195 (RFC 9325) recommended suites for TLS 1.2; TLS 1.3 suites are all AEAD and always on.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                             else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def server_context(certificate_file: Path, private_key_file: Path, ca_file: Path | None,
                   require_client_certificate: bool) -> ssl.SSLContext:
    """The listener's context; with *require_client_certificate*, peers must present one signed by *ca_file*."""
    context = _base(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate_file, private_key_file)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_NONE
    return context


def client_context(ca_file: Path, certificate_file: Path | None = None,
                   private_key_file: Path | None = None) -> ssl.SSLContext:
    """A destination's context: its certificate must chain to *ca_file* and name the host we connect to."""
    context = _base(ssl.Purpose.SERVER_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.load_verify_locations(cafile=ca_file)
    if certificate_file is not None:
        context.load_cert_chain(certificate_file, private_key_file)
    return context


def certificate_problems(where: str, certificate_file: Path | None, private_key_file: Path | None,
                         ca_file: Path | None, now: dt.datetime | None = None) -> list[str]:
    """Every problem with the named files: unreadable, not PEM, expired or not yet valid, key not matching."""
    now = now or dt.datetime.now(dt.UTC)
    problems = []
    for label, path in (("certificate_file", certificate_file), ("ca_file", ca_file)):
        if path is None:
            continue
        try:
            certificates = x509.load_pem_x509_certificates(path.read_bytes())
        except OSError as exc:
            problems.append(f"{where}.{label}: cannot read {path} ({exc.strerror})")
            continue
        except ValueError:
            problems.append(f"{where}.{label}: {path} holds no PEM certificate")
            continue
        for certificate in certificates[:1] if label == "certificate_file" else certificates:
            if certificate.not_valid_after_utc <= now:
                problems.append(f"{where}.{label}: certificate in {path} expired on "
                                f"{certificate.not_valid_after_utc:%Y-%m-%d}")
            elif certificate.not_valid_before_utc > now:
                problems.append(f"{where}.{label}: certificate in {path} is not valid before "
                                f"{certificate.not_valid_before_utc:%Y-%m-%d}")
    if certificate_file is not None and not problems:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certificate_file, private_key_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{where}.private_key_file: cannot use it with the certificate ({type(exc).__name__})")
    return problems


def check_certificates(config: GatewayConfig) -> None:
    """Check every certificate and key the configuration names; one :class:`ConfigError` lists all problems."""
    problems = []
    listener = config.node.tls
    if listener is not None:
        problems += certificate_problems("node.tls", listener.certificate_file, listener.private_key_file,
                                         listener.ca_file)
    for index, destination in enumerate(config.destinations):
        tls = getattr(destination, "tls", None)
        if tls is not None:
            problems += certificate_problems(f"destinations[{index}].tls", tls.certificate_file,
                                             tls.private_key_file, tls.ca_file)
    if config.inference.backend == "triton":
        for index, server in enumerate(config.inference.servers):
            problems += certificate_problems(f"inference.servers[{index}]", server.certificate_file,
                                             server.private_key_file, server.ca_file)
    if problems:
        raise ConfigError("TLS", problems)


#: subjectAltName kinds (as :meth:`ssl.SSLSocket.getpeercert` names them) a peer's ``certificate_name`` may match.
_NAME_KINDS = frozenset({"DNS", "URI", "email"})
_CASE_INSENSITIVE = frozenset({"CN", "DNS"})


@dataclass(frozen=True)
class ClientCertificate:
    """The names a verified client certificate carries: subject common names and DNS, URI, e-mail subjectAltNames."""

    names: frozenset[tuple[str, str]]  # (kind, value): kind is "CN" or a subjectAltName kind

    @classmethod
    def from_peercert(cls, certificate: Mapping[str, Any]) -> ClientCertificate:
        """The names in *certificate*, a dictionary as :meth:`ssl.SSLSocket.getpeercert` returns it."""
        names = {("CN", str(value)) for rdn in certificate.get("subject", ()) for key, value in rdn
                 if key == "commonName"}
        names |= {(str(kind), str(value)) for kind, value in certificate.get("subjectAltName", ())
                  if kind in _NAME_KINDS}
        return cls(frozenset(names))

    def carries(self, name: str) -> bool:
        """Whether *name* is one of the names, exactly (host names and common names without regard to case)."""
        return any(value == name or (kind in _CASE_INSENSITIVE and value.casefold() == name.casefold())
                   for kind, value in self.names)


def client_certificate(sock: socket.socket) -> ClientCertificate | None:
    """The verified client certificate of an accepted connection; ``None`` on plain TCP or without one.

    A certificate the listener did not verify (``require_client_certificate = false``) counts as none.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        certificate = sock.getpeercert()
    except (OSError, ValueError):  # closed meanwhile, or the handshake never completed
        return None
    return ClientCertificate.from_peercert(certificate) if certificate else None
