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


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: apt-get install systemd"
    # A root holding the system's own units, ours, and a stand-in for the venv's python (verify checks ExecStart).
    system_units = next(path for path in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                        if path.is_dir())
    shutil.copytree(system_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    ours = tmp_path / "etc/systemd/system"
    ours.mkdir(parents=True)
    units = [NODE_UNIT, SHRED_UNIT, TIMER_UNIT]
    for name in units:
        shutil.copy(DEPLOY / name, ours / name)
    python = tmp_path / _unit(NODE_UNIT)["Service"]["ExecStart"].split()[0].lstrip("/")
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    result = subprocess.run([analyze, "verify", f"--root={tmp_path}", "--man=no", *units],
                            capture_output=True, text=True, timeout=60, check=False)
    # Unknown keys and unparsable values are only warnings, with status 0: any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


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
