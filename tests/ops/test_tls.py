"""DICOM TLS: mutual authentication on the listener, verified TLS to destinations, certificates checked at start-up."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from gateway.config import parse_config
from gateway.errors import ConfigError, SendError
from gateway.ops.tls import ClientCertificate, client_context
from gateway.receiving.policy import AssociationPolicy
from gateway.sending.scu import Sender
from tests.conftest import (
    REPO,
    CTSeries,
    NodeProcess,
    dcmtk_env,
    require_tool,
    spooled_instances,
    write_config,
)
from tests.pki import PKI, Pair, make_pki

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_node(factory: Callable[..., NodeProcess], pki: PKI, *, plain: bool | None = False, extra: str = "",
             server: tuple[Path, Path] | None = None, **config: Any) -> NodeProcess:
    """A node with ``[node.tls]``; *plain* ``None`` leaves ``node.plain`` out of the file (its default)."""
    certificate, key = server or (pki.server.certificate, pki.server.key)
    plain_line = "" if plain is None else f"plain = {'true' if plain else 'false'}\n"
    node_lines = (f"{plain_line}max_pending_connections = 256\n\n[node.tls]\nport = 0\n"
                  f'certificate_file = "{certificate}"\nprivate_key_file = "{key}"\nca_file = "{pki.ca}"\n{extra}')
    return factory(extra_node=node_lines, **config)


def tls_echo(node: NodeProcess, context: ssl.SSLContext, server_name: str = "localhost") -> bool:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", node.tls_port, ae_title="CONTOUR_GW", tls_args=(context, server_name))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def test_mutual_tls_with_pynetdicom_and_dcmtk(node_factory: Callable[..., NodeProcess], pki: PKI) -> None:
    node = tls_node(node_factory, pki)
    assert node.port == 0 and node.tls_port > 0  # no plain port at all
    assert tls_echo(node, client_context(pki.ca, pki.client.certificate, pki.client.key))
    result = subprocess.run([require_tool("echoscu"), "+tls", str(pki.client.key), str(pki.client.certificate),
                             "+cf", str(pki.ca), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                             str(node.tls_port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.events()[-1]["event"] != "tls_handshake_failed"


def test_a_client_without_certificate_is_refused(node_factory: Callable[..., NodeProcess], pki: PKI) -> None:
    node = tls_node(node_factory, pki)
    assert not tls_echo(node, client_context(pki.ca))
    assert "CERTIFICATE" in node.wait_for("tls_handshake_failed")["reason"].upper()
    assert not any(e["event"] == "association_accepted" for e in node.events())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # deprecated: that is the point
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(node_factory: Callable[..., NodeProcess], pki: PKI,
                                     version: ssl.TLSVersion) -> None:
    node = tls_node(node_factory, pki)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    context.load_cert_chain(pki.client.certificate, pki.client.key)
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname="localhost")
    reason = node.wait_for("tls_handshake_failed")["reason"].upper()
    assert "VERSION" in reason or "PROTOCOL" in reason


def test_silent_sockets_do_not_hold_up_a_tls_association(node_factory: Callable[..., NodeProcess], pki: PKI) -> None:
    node = tls_node(node_factory, pki, extra="handshake_seconds = 1")
    # Receivers finish importing on their first connections; the deadline counts from the hand-over to one.
    assert tls_echo(node, client_context(pki.ca, pki.client.certificate, pki.client.key))
    silent = [socket.create_connection(("127.0.0.1", node.tls_port)) for _ in range(100)]
    try:
        started = time.monotonic()
        assert tls_echo(node, client_context(pki.ca, pki.client.certificate, pki.client.key))
        assert time.monotonic() - started < 2
        for sock in silent:  # each one closed by its handshake deadline (1 s) + 1 s
            sock.settimeout(max(0.05, started + 2 - time.monotonic()))
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()
    assert node.wait_for("tls_handshake_failed")["reason"] == "timeout"


class _TLSServer:
    """A TLS server that counts the application bytes it receives (there must be none)."""

    def __init__(self, certificate: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.handshakes_failed = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(3)
                while chunk := tls.recv(65536):
                    self.received += len(chunk)
        except OSError:
            self.handshakes_failed += 1


def _sender_to(port: int, tls: dict[str, str], ae_title: str = "TPS") -> tuple[Sender, object]:
    config = parse_config({"destinations": [{"name": "tps", "ae_title": ae_title, "host": "127.0.0.1", "port": port,
                                             "connect_timeout_seconds": 5, "tls": tls,
                                             "retry": {"max_attempts": 1}}]})
    return Sender(config), config.destination("tps")


@pytest.mark.parametrize("problem", ["wrong_host", "untrusted"])
def test_the_scu_sends_nothing_to_a_server_it_cannot_verify(pki: PKI, problem: str) -> None:
    pair = pki.wrong_host if problem == "wrong_host" else pki.server
    server = _TLSServer(pair.certificate, pair.key)
    ca = str(pki.ca if problem == "wrong_host" else pki.other_ca)
    sender, destination = _sender_to(server.port, {"ca_file": ca})
    with pytest.raises(SendError):
        sender.echo(destination)  # type: ignore[arg-type]
    server.thread.join(timeout=10)
    assert server.received == 0
    assert server.handshakes_failed == 1


def test_the_scu_talks_verified_tls_to_our_own_listener(node_factory: Callable[..., NodeProcess], pki: PKI) -> None:
    node = tls_node(node_factory, pki)
    sender, destination = _sender_to(node.tls_port, {"ca_file": str(pki.ca), "server_name": "localhost",
                                                     "certificate_file": str(pki.client.certificate),
                                                     "private_key_file": str(pki.client.key)}, "CONTOUR_GW")
    sender.echo(destination)  # type: ignore[arg-type]
    assert node.wait_for("association_accepted")["calling_ae"] == "CONTOUR_GW"


def test_expired_or_unreadable_certificates_stop_the_start(tmp_path: Path, pki: PKI) -> None:
    tls = (f'plain = false\n\n[node.tls]\ncertificate_file = "{pki.expired.certificate}"\n'
           f'private_key_file = "{pki.expired.key}"\nca_file = "{tmp_path / "missing.pem"}"\n')
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var", extra_node=tls)
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)], capture_output=True,
                            text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2
    assert "node.tls.certificate_file: certificate in" in result.stderr and "expired on" in result.stderr
    assert "node.tls.ca_file: cannot read" in result.stderr


def _dcmtk(tool: str, port: int, calling: str, *args: str,
           client: Pair | None = None, ca: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk SCU against the node, over TLS with *client*'s certificate when given."""
    tls = ("+tls", str(client.key), str(client.certificate), "+cf", str(ca)) if client is not None else ()
    return subprocess.run([require_tool(tool), *tls, "-aet", calling, "-aec", "CONTOUR_GW", "127.0.0.1", str(port),
                           *args], capture_output=True, text=True, env=dcmtk_env(), timeout=60, check=False)


def _peer(name: str, ae_title: str, certificate_name: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "quiet_seconds": 1}
    return entry | ({"certificate_name": certificate_name} if certificate_name else {})


#: The catch-all comes first: a bound AE title needs its certificate whatever the order of the entries.
BOUND_PEERS = [_peer("others", "*"), _peer("pacs_a", "PACS_A", "pacs-a.hospital"),
               _peer("pacs_b", "PACS_B", "pacs-b.hospital")]


class TestPeerCertificate:
    """``[[peers]] certificate_name``: an AE title bound to the certificate it must present."""

    def test_only_the_named_certificate_may_associate_as_the_peer(
            self, node_factory: Callable[..., NodeProcess], pki: PKI, ct_series: Callable[..., CTSeries]) -> None:
        node = tls_node(node_factory, pki, plain=True, peers=BOUND_PEERS)
        files = [str(f) for f in ct_series(2).files]

        result = _dcmtk("storescu", node.tls_port, "PACS_A", *files, client=pki.pacs_b, ca=pki.ca)
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
        node.wait_for("association_rejected", reason="client_certificate_mismatch", calling_ae="PACS_A", tls=True)

        result = _dcmtk("storescu", node.port, "PACS_A", *files)  # the plain port: no certificate at all
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
        node.wait_for("association_rejected", reason="client_certificate_missing", calling_ae="PACS_A", tls=False)
        assert spooled_instances(node.data_dir) == []
        assert not any(e["event"] == "association_accepted" for e in node.events())

        result = _dcmtk("storescu", node.tls_port, "PACS_A", *files, client=pki.pacs_a, ca=pki.ca)  # subject CN
        assert result.returncode == 0, result.stdout + result.stderr
        assert node.wait_for("association_accepted", calling_ae="PACS_A")["peer"] == "pacs_a"
        assert len(spooled_instances(node.data_dir)) == 2
        result = _dcmtk("echoscu", node.tls_port, "PACS_B", client=pki.pacs_b, ca=pki.ca)  # DNS subjectAltName
        assert result.returncode == 0, result.stdout + result.stderr
        assert node.wait_for("association_accepted", calling_ae="PACS_B")["peer"] == "pacs_b"

        # AE titles bound to no certificate still come in on the plain port, written explicitly: no warning.
        assert _dcmtk("echoscu", node.port, "MODALITY").returncode == 0
        assert node.wait_for("association_accepted", calling_ae="MODALITY", tls=False)["peer"] == "others"
        assert not any(e["event"] == "plain_port_unauthenticated" for e in node.events())
        text = node.log_text()
        assert "pacs-b.hospital" not in text and "PACS B" not in text  # reason codes, not certificate contents

    def test_the_policy_matches_common_names_and_subject_alternative_names(self) -> None:
        tls = {"certificate_file": "server.pem", "private_key_file": "server.key", "ca_file": "ca.pem"}
        config = parse_config({"node": {"tls": tls}, "peers": BOUND_PEERS})
        policy = AssociationPolicy(config)
        a = ClientCertificate.from_peercert({"subject": ((("commonName", "PACS-A.hospital"),),),
                                             "subjectAltName": (("email", "dicom@pacs-a.hospital"),)})
        b = ClientCertificate.from_peercert({"subject": ((("organizationName", "pacs-a.hospital"),),
                                                         (("commonName", "PACS B"),)),
                                             "subjectAltName": (("IP Address", "127.0.0.1"),
                                                                ("URI", "urn:pacs-b.hospital"))})
        decide = policy.decide
        assert decide("PACS_A", "CONTOUR_GW", "127.0.0.1", a)[0] == config.peers[1]
        assert decide("PACS_A", "CONTOUR_GW", "127.0.0.1", b) == (None, "client_certificate_mismatch")
        assert decide("PACS_A", "CONTOUR_GW", "127.0.0.1") == (None, "client_certificate_missing")
        assert decide("PACS_B", "CONTOUR_GW", "127.0.0.1", b) == (None, "client_certificate_mismatch")
        assert decide("PACS_B", "CONTOUR_GW", "127.0.0.1", ClientCertificate(frozenset({("URI", "pacs-b.hospital")}))
                      )[0] == config.peers[2]
        assert decide("OTHER", "CONTOUR_GW", "127.0.0.1") == (config.peers[0], None)
        assert decide("PACS_A", "NOT_US", "127.0.0.1", a) == (None, "called_ae_not_recognised")

    @pytest.mark.parametrize("tls", [None, {"require_client_certificate": False}])
    def test_a_certificate_name_needs_mutual_tls(self, tls: dict[str, Any] | None) -> None:
        node: dict[str, Any] = {}
        if tls is not None:
            node["tls"] = {"certificate_file": "server.pem", "private_key_file": "server.key", **tls}
        with pytest.raises(ConfigError) as info:
            parse_config({"node": node, "peers": BOUND_PEERS})
        problems = "\n".join(info.value.problems)
        for index in (1, 2):
            assert f"peers[{index}].certificate_name: needs [node.tls] with require_client_certificate = true" \
                in problems
        assert "peers[0]" not in problems


@pytest.mark.parametrize("plain", [None, True, False], ids=["plain_unset", "plain_true", "plain_false"])
def test_a_plain_port_left_open_by_default_is_warned_about(node_factory: Callable[..., NodeProcess], pki: PKI,
                                                            plain: bool | None) -> None:
    node = tls_node(node_factory, pki, plain=plain)
    warnings = [e for e in node.events() if e["event"] == "plain_port_unauthenticated"]
    if plain is None:
        assert [w["port"] for w in warnings] == [node.port] and node.port > 0
        assert warnings[0]["level"] == "warning"
    else:
        assert warnings == []
    if plain is not False:
        assert _dcmtk("echoscu", node.port, "PACS").returncode == 0
    else:
        assert node.port == 0
