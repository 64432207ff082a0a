"""The service files: least privilege in the systemd units, a retention sweep on its own timer (and its container
equivalent), a system configuration that validates, and an install that never makes a master key silently."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig, parse_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
NODE_UNIT = "contour-gateway.service"
SHRED_UNIT = "contour-gateway-shred.service"
TIMER_UNIT = "contour-gateway-shred.timer"
ENV_FILE = "/etc/contour-gateway/env"
#: Least privilege that every service of the gateway keeps (value as in the node's unit).
HARDENING = ("User", "Group", "UMask", "LimitCORE", "NoNewPrivileges", "ProtectSystem", "ReadWritePaths",
             "StateDirectory", "StateDirectoryMode", "ProtectHome", "PrivateTmp", "PrivateDevices",
             "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
             "ProtectClock", "ProtectHostname", "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
             "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures", "CapabilityBoundingSet",
             "AmbientCapabilities")


def _unit(name: str = NODE_UNIT) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / name).read_text())
    return unit


def _system_config() -> GatewayConfig:
    return parse_config(tomllib.loads((DEPLOY / "gateway.toml").read_text()))


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose


@pytest.mark.parametrize("name", [NODE_UNIT, SHRED_UNIT])
def test_the_services_run_with_least_privilege_and_no_core_dumps(name: str) -> None:
    service = _unit(name)["Service"]
    assert service["User"] == service["Group"] == "contour-gw"
    expected = {"ProtectSystem": "strict", "LimitCORE": "0", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "UMask": "0077", "CapabilityBoundingSet": "", "ProtectHome": "yes"}
    assert {key: service.get(key) for key in expected} == expected
    node = _unit(NODE_UNIT)["Service"]
    assert {key: service.get(key) for key in HARDENING} == {key: node.get(key) for key in HARDENING}


@pytest.mark.parametrize("name", [NODE_UNIT, SHRED_UNIT])
def test_the_services_require_their_environment_file(name: str) -> None:
    # A leading '-' would start the unit without the file: the failure would come later, and say less.
    assert _unit(name)["Service"]["EnvironmentFile"] == ENV_FILE


@pytest.mark.parametrize("name", [NODE_UNIT, SHRED_UNIT])
def test_the_services_and_the_system_configuration_agree(name: str) -> None:
    service = _unit(name)["Service"]
    config = _system_config()
    writable = {config.node.data_dir, config.encryption.key_dir}
    assert {Path(path) for path in service["ReadWritePaths"].split()} == writable  # the only writable places
    assert {Path("/var/lib", folder) for folder in service["StateDirectory"].split()} == writable
    assert service["StateDirectoryMode"] == "0700"
    assert service["ExecStart"].endswith("--config /etc/contour-gateway/gateway.toml")
    assert str(config.inference.models_dir) == "/opt/contour-gateway/models"
    assert "$(PREFIX)/.venv" in (REPO / "Makefile").read_text()


def test_the_shred_service_sweeps_once_with_the_node_configuration() -> None:
    shred = _unit(SHRED_UNIT)["Service"]
    node = _unit(NODE_UNIT)["Service"]
    assert shred["Type"] == "oneshot"
    assert "Restart" not in shred  # the timer starts the next sweep
    assert shred["ExecStart"].split() == ["shred" if word == "serve" else word for word in node["ExecStart"].split()]


def test_the_timer_sweeps_at_the_configured_interval_whether_or_not_the_node_runs() -> None:
    timer = _unit(TIMER_UNIT)
    every = timer["Timer"]
    assert int(every["OnUnitActiveSec"]) == _system_config().retention.sweep_interval_seconds  # plain seconds
    assert every["OnBootSec"] == "1min"  # catches up on sweeps missed while the machine was off
    assert every["AccuracySec"] == "1s"
    assert every["Persistent"] == "true"
    assert every["Unit"] == SHRED_UNIT
    assert timer["Install"]["WantedBy"] == "timers.target"
    tied = ("BindsTo", "PartOf", "Requires", "Requisite", "After", "StopWhenUnneeded")
    assert [key for key in tied if key in timer["Unit"]] == []
    assert [key for key in tied if key in _unit(SHRED_UNIT)["Unit"]] == []


def _systemd_verify(root: Path, units: list[Path]) -> tuple[int, str]:
    """``systemd-analyze verify`` of *units* in a root holding the system's own units, ours, and a stand-in for
    each unit's ExecStart program (verify checks that it exists)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: apt-get install systemd"
    system_units = next(path for path in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                        if path.is_dir())
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    ours = root / "etc/systemd/system"
    ours.mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, ours / unit.name)
        parsed = configparser.ConfigParser(strict=False, interpolation=None)
        parsed.read_string(unit.read_text())
        if parsed.has_option("Service", "ExecStart"):
            program = root / parsed["Service"]["ExecStart"].split()[0].lstrip("/")
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\n")
            program.chmod(0o755)
    result = subprocess.run([analyze, "verify", f"--root={root}", "--man=no", *(unit.name for unit in units)],
                            capture_output=True, text=True, timeout=60, check=False)
    # Unknown keys and unparsable values are only warnings, with status 0: any output is a failure.
    return result.returncode, result.stdout + result.stderr


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    units = [DEPLOY / name for name in (NODE_UNIT, SHRED_UNIT, TIMER_UNIT)]
    assert _systemd_verify(tmp_path, units) == (0, "")


def test_the_container_does_not_run_as_root() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users == ["contour-gw"]
    assert not any("MASTER_KEY=" in line for line in lines if not line.startswith("#"))


def test_compose_runs_the_shredder_beside_the_node_on_the_same_volumes() -> None:
    services = _compose()["services"]
    node, shredder = services["gateway"], services["shredder"]
    assert node["command"][0] == "serve"
    assert shredder["command"] == ["shred", *node["command"][1:], "--loop"]
    assert shredder["volumes"] == node["volumes"]
    config = _system_config()
    mounted = {volume.split(":")[1] for volume in node["volumes"]}
    assert {str(config.node.data_dir), str(config.encryption.key_dir)} <= mounted
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f'VOLUME ["{config.node.data_dir}", "{config.encryption.key_dir}"]' in dockerfile
    for service in (node, shredder):
        assert service["env_file"] == ENV_FILE  # the short form: Compose refuses to start without it
        assert service["ulimits"]["core"] == 0
        assert service["restart"] == "always"
        assert service.get("read_only") is True


def test_make_install_enables_the_timer_and_never_makes_a_key_itself() -> None:
    # Flags of an enclosing make (`make test`) stay out; PREFIX is pinned as it may be set in the environment.
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry_run = subprocess.run(["make", "--no-print-directory", "-n", "install", "PREFIX=/opt/contour-gateway"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"deploy/{SHRED_UNIT}" in dry_run
    assert f"deploy/{TIMER_UNIT} /etc/systemd/system/" in dry_run
    assert f"systemctl enable --now {TIMER_UNIT}" in dry_run.splitlines()
    assert "install -d -o contour-gw -g contour-gw -m 0700 /var/lib/contour-gateway /var/lib/contour-gateway-keys" \
        in dry_run.splitlines()
    # The keygen command is only shown, and only when the env file is missing.
    assert f"test -f {ENV_FILE} || {{ \\" in dry_run.splitlines()
    keygen = [line.strip() for line in dry_run.splitlines() if "keygen" in line]
    assert keygen == [f'echo "  /opt/contour-gateway/.venv/bin/python -m gateway keygen --env-file {ENV_FILE}"; \\']


# The inference farm's Triton server (deploy/triton): a container, or a systemd unit on bare metal.

TRITON = DEPLOY / "triton"
TRITON_UNIT = "contour-triton.service"
TRITON_REPOSITORY = "/srv/triton/models"
#: What makes Triton speak gRPC with mutual TLS only (the flags scripts/triton_local.py uses for the tests too).
TRITON_TLS_FLAGS = ("--allow-http", "--grpc-use-ssl-mutual", "--grpc-server-cert", "--grpc-server-key",
                    "--grpc-root-cert")
#: The node's hardening that a GPU server keeps as it is (it has its own user, no writable path, and needs the GPU).
TRITON_HARDENING = tuple(key for key in HARDENING if key not in (
    "User", "Group", "ReadWritePaths", "StateDirectory", "StateDirectoryMode", "PrivateDevices"))


def _triton_service() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((TRITON / "docker-compose.yml").read_text())
    assert list(compose["services"]) == ["triton"]
    assert "volumes" not in compose  # no named volume: the server keeps nothing
    service: dict[str, Any] = compose["services"]["triton"]
    return service


def _triton_unit() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((TRITON / TRITON_UNIT).read_text())
    return unit["Service"]


def _flags(words: list[str]) -> dict[str, str]:
    return {key: value for key, _, value in (word.partition("=") for word in words if word.startswith("--"))}


def _triton_commands() -> dict[str, list[str]]:
    """tritonserver's command line in the container and in the systemd unit (its continuation lines joined)."""
    unit = [word for word in _triton_unit()["ExecStart"].split() if word != "\\"]
    return {"compose": _triton_service()["command"], "systemd": unit}


def test_the_triton_server_speaks_grpc_with_mutual_tls_only() -> None:
    commands = _triton_commands()
    assert commands["compose"][0] == "tritonserver"
    assert commands["systemd"][0] == "/opt/tritonserver/bin/tritonserver"
    tls = {name: {key: flags[key] for key in TRITON_TLS_FLAGS}
           for name, flags in ((name, _flags(words)) for name, words in commands.items())}
    assert tls["compose"] == tls["systemd"]
    assert tls["compose"]["--allow-http"] == "false"
    assert tls["compose"]["--grpc-use-ssl-mutual"] == "true"
    for name, words in commands.items():
        flags = _flags(words)
        assert [key for key in flags if key.startswith("--http")] == [], name
        assert flags.get("--grpc-use-ssl") in (None, "true"), name
        assert flags["--log-verbose"] == "0", name  # request details stay out of the log
    local = (REPO / "scripts" / "triton_local.py").read_text()
    assert all(f'"{flag}=' in local for flag in TRITON_TLS_FLAGS)


def test_the_triton_container_reads_the_repository_and_tls_files_and_writes_nothing() -> None:
    service = _triton_service()
    mounts = [volume.split(":") for volume in service["volumes"]]
    assert all(len(mount) == 3 and mount[0].startswith("/") and mount[2] == "ro" for mount in mounts)
    folders = {target: source for source, target, _ in mounts}
    flags = _flags(service["command"])
    assert folders[flags["--model-repository"]] == TRITON_REPOSITORY
    for flag in ("--grpc-server-cert", "--grpc-server-key", "--grpc-root-cert"):
        assert str(Path(flags[flag]).parent) in folders
    assert service["read_only"] is True
    assert service["tmpfs"] == ["/tmp"]
    assert service["user"] not in ("root", "0", "0:0")
    assert service["cap_drop"] == ["ALL"]
    assert service["security_opt"] == ["no-new-privileges:true"]
    assert service["ulimits"]["core"] == 0
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert [(device["driver"], device["capabilities"]) for device in devices] == [("nvidia", ["gpu"])]


def test_the_triton_container_publishes_grpc_and_keeps_metrics_off_the_clinical_network() -> None:
    service = _triton_service()
    flags = _flags(service["command"])
    grpc, metrics = flags.get("--grpc-port", "8001"), flags["--metrics-port"]
    published = {port.rsplit(":", 1)[1]: port for port in service["ports"]}
    assert set(published) == {grpc, metrics}
    assert published[grpc] == f"{grpc}:{grpc}"
    address = published[metrics].rsplit(":", 2)[0]
    assert address.endswith("127.0.0.1}")  # an address of the host's, loopback unless the site sets one


def test_the_triton_image_is_nvidias_with_the_sites_wheel_and_runs_as_its_unprivileged_user() -> None:
    lines = (TRITON / "Dockerfile").read_text().splitlines()
    base = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(base) == 1 and base[0].startswith("nvcr.io/nvidia/tritonserver:") and base[0].endswith("-py3")
    assert [line.split()[1] for line in lines if line.startswith("USER ")] == ["triton-server"]
    assert "COPY dist/*.whl /tmp/wheels/" in lines
    build = "\n".join(lines)
    # The CPU onnxruntime that contour-gateway depends on goes before the GPU build comes (same module).
    assert build.index("uninstall --yes onnxruntime") < build.index("install --no-cache-dir \"onnxruntime-gpu")
    assert base[0] in (TRITON / "README.md").read_text()
    assert _triton_service()["build"] == {"context": "../..", "dockerfile": "deploy/triton/Dockerfile"}


def test_the_triton_unit_runs_with_least_privilege_and_no_writable_path() -> None:
    service = _triton_unit()
    assert service["User"] == service["Group"] == "contour-triton"
    expected = {"ProtectSystem": "strict", "LimitCORE": "0", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "ProtectHome": "yes", "CapabilityBoundingSet": "", "DevicePolicy": "closed", "RemoveIPC": "yes"}
    assert {key: service.get(key) for key in expected} == expected
    node = _unit(NODE_UNIT)["Service"]
    assert {key: service.get(key) for key in TRITON_HARDENING} == {key: node.get(key) for key in TRITON_HARDENING}
    writable = ("ReadWritePaths", "StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory",
                "ConfigurationDirectory", "DynamicUser")
    assert [key for key in writable if key in service] == []
    flags = _flags(_triton_commands()["systemd"])
    readonly = service["ReadOnlyPaths"].split()
    assert flags["--model-repository"] == TRITON_REPOSITORY and TRITON_REPOSITORY in readonly
    assert {str(Path(flags[flag]).parent) for flag in ("--grpc-server-cert", "--grpc-server-key",
                                                       "--grpc-root-cert")} <= set(readonly)
    assert flags["--metrics-address"] == "127.0.0.1"
    allowed = [line.split()[0] for line in (TRITON / TRITON_UNIT).read_text().splitlines()
               if line.startswith("DeviceAllow=")]
    assert all(device.removeprefix("DeviceAllow=").startswith("/dev/nvidia") for device in allowed)
    readme = (TRITON / "README.md").read_text()
    assert f"triton-repo \\\n    --config /etc/contour-gateway/gateway.toml --out {TRITON_REPOSITORY}" in readme


def test_systemd_accepts_the_triton_unit(tmp_path: Path) -> None:
    assert _systemd_verify(tmp_path, [TRITON / TRITON_UNIT]) == (0, "")
