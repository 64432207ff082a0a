"""A throw-away PKI for the TLS tests: a CA, server and client certificates, and the broken kinds."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path
    server: Pair  # localhost / 127.0.0.1
    client: Pair
    wrong_host: Pair  # signed by the CA, named other.example
    expired: Pair
    other_ca: Path  # a CA that signed none of these
    pacs_a: Pair  # client: subject CN pacs-a.hospital (its only subjectAltName is an e-mail address)
    pacs_b: Pair  # client: subject CN "PACS B", DNS subjectAltName pacs-b.hospital
    untrusted: Pair  # server: localhost / 127.0.0.1, signed by other_ca
    untrusted_client: Pair  # client: signed by other_ca


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    pair.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def _ca(common: str, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common: str, names: list[x509.GeneralName],
          usage: x509.ObjectIdentifier, valid: tuple[dt.datetime, dt.datetime]
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(ca[0].subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .sign(ca[1], hashes.SHA256()))
    return certificate, key


def make_pki(folder: Path) -> PKI:
    """Write the whole PKI under *folder*."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    valid = (now - dt.timedelta(days=1), now + dt.timedelta(days=10))
    ca = _ca("Test Hospital CA", now)
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _leaf(ca, "contour-gw", local, ExtendedKeyUsageOID.SERVER_AUTH, valid)
    client = _leaf(ca, "PACS", [x509.DNSName("pacs.local")], ExtendedKeyUsageOID.CLIENT_AUTH, valid)
    wrong = _leaf(ca, "other", [x509.DNSName("other.example")], ExtendedKeyUsageOID.SERVER_AUTH, valid)
    expired = _leaf(ca, "old", local, ExtendedKeyUsageOID.SERVER_AUTH,
                    (now - dt.timedelta(days=30), now - dt.timedelta(days=1)))
    other_ca = _ca("Somebody Else CA", now)
    pacs_a = _leaf(ca, "pacs-a.hospital", [x509.RFC822Name("dicom@pacs-a.hospital")],
                   ExtendedKeyUsageOID.CLIENT_AUTH, valid)
    pacs_b = _leaf(ca, "PACS B", [x509.DNSName("pacs-b.hospital")], ExtendedKeyUsageOID.CLIENT_AUTH, valid)
    ca_path, other_path = folder / "ca.pem", folder / "other-ca.pem"
    ca_path.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    other_path.write_bytes(other_ca[0].public_bytes(serialization.Encoding.PEM))
    return PKI(ca_path, _write(folder, "server", *server), _write(folder, "client", *client),
               _write(folder, "wrong-host", *wrong), _write(folder, "expired", *expired), other_path,
               _write(folder, "pacs-a", *pacs_a), _write(folder, "pacs-b", *pacs_b),
               _write(folder, "untrusted", *_leaf(other_ca, "impostor", local, ExtendedKeyUsageOID.SERVER_AUTH, valid)),
               _write(folder, "untrusted-client", *_leaf(other_ca, "PACS", [x509.DNSName("pacs.local")],
                                                         ExtendedKeyUsageOID.CLIENT_AUTH, valid)))
