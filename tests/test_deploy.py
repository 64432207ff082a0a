"""The service files: least privilege in the systemd unit, and a system configuration that validates."""

from __future__ import annotations

import configparser
import tomllib

from gateway.config import parse_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "contour-gateway.service").read_text())
    return unit


def test_the_unit_runs_with_least_privilege_and_no_core_dumps() -> None:
    service = _unit()["Service"]
    assert service["User"] == service["Group"] == "contour-gw"
    expected = {"ProtectSystem": "strict", "LimitCORE": "0", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "UMask": "0077", "CapabilityBoundingSet": "", "ProtectHome": "yes"}
    assert {key: service.get(key) for key in expected} == expected


def test_the_unit_and_the_system_configuration_agree() -> None:
    service = _unit()["Service"]
    raw = tomllib.loads((DEPLOY / "gateway.toml").read_text())
    config = parse_config(raw)
    assert service["ReadWritePaths"] == str(config.node.data_dir)  # the only writable place
    assert service["ExecStart"].endswith("serve --config /etc/contour-gateway/gateway.toml")
    assert str(config.inference.models_dir) == "/opt/contour-gateway/models"
    assert "$(PREFIX)/.venv" in (REPO / "Makefile").read_text()


def test_the_container_does_not_run_as_root() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users == ["contour-gw"]
    assert not any("MASTER_KEY=" in line for line in lines if not line.startswith("#"))
