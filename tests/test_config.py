"""Configuration: the embedded default loads; every bad key gets its own message; exit code 2."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MAX_AGE_CEILING_SECONDS, load_config, parse_config
from gateway.errors import ConfigError
from gateway.inference_servers import RemoteModel
from gateway.routes import Route

REPO = Path(__file__).resolve().parents[1]


def _valid() -> dict[str, Any]:
    return {
        "node": {"ae_title": "CONTOUR_GW", "bind": "127.0.0.1", "port": 11112, "data_dir": "var"},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "10.1.2.0/24", "quiet_seconds": 30}],
        "destinations": [{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 4242}],
        "routes": [{"name": "default", "match": {"Modality": "CT"}, "model": "default", "destinations": ["tps"]}],
        "retention": {"max_age_seconds": 86400, "sweep_interval_seconds": 300},
    }


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


class TestEmbeddedDefault:
    def test_default_file_loads_and_resolves_data_dir_next_to_it(self) -> None:
        config = load_config(REPO / "config" / "gateway.toml")
        assert config.node.ae_title == "CONTOUR_GW"
        assert config.node.port == 11112
        assert config.node.data_dir == (REPO / "var").resolve()
        assert config.retention.max_age_seconds <= MAX_AGE_CEILING_SECONDS
        assert [r.destinations for r in config.routes] == [["folder"]]
        assert [d.type for d in config.destinations] == ["folder", "dicom"]
        assert (config.inference.templates_dir / "thorax.toml").is_file()  # config/templates/, the shipped ones

    def test_commented_examples_are_valid_when_uncommented(self, tmp_path: Path) -> None:
        """The 4D-CT route, the template, the [limits] block and the inference farm are shipped commented out;
        uncommented, they load as documented."""
        lines = []
        for line in (REPO / "config" / "gateway.toml").read_text().splitlines():
            body = line[2:] if line.startswith("# ") else None
            lines.append(body if body is not None and (body.startswith("[") or " = " in body.split("#")[0])
                         else line)
        path = tmp_path / "gateway.toml"
        path.write_text("\n".join(lines) + "\n")
        config = load_config(path)
        [route] = config.routes
        series = {"CT 40%": ["ORIGINAL", "PRIMARY", "AXIAL"], "AVG": ["DERIVED", "SECONDARY", "AXIAL", "AVERAGE"],
                  "MIP": ["DERIVED", "SECONDARY", "AXIAL", "CT_SOM5 MIP"]}
        reasons = {description: route.images.skip_reason(image_type, {"SeriesDescription": description})
                   for description, image_type in series.items()}
        assert reasons == {"CT 40%": "skipped_by_route", "AVG": None, "MIP": "image_type_mip"}
        assert config.limits.max_dataset_bytes == 128 * 1024 * 1024
        assert (route.template, route.qa) == ("thorax", "annotate")
        assert config.inference.templates_dir == (tmp_path / "templates").resolve()  # beside the file, by default
        assert config.inference.backend == "triton"
        assert [(s.name, s.url, s.expected_name) for s in config.inference.servers] == [
            ("gpu1", "gpu1.hospital.local:8001", "gpu1.hospital.local")]
        assert config.inference.remote.for_model("default").attempts == 3

    def test_the_readmes_4d_ct_route_contours_the_average_only(self) -> None:
        [block] = [b for b in (REPO / "README.md").read_text().split("```toml\n")[1:] if "skip_image_types" in b]
        [route] = [Route.model_validate(r) for r in tomllib.loads(block.split("```")[0])["routes"]]
        series = {"CT 0%": ["ORIGINAL", "PRIMARY", "AXIAL"], "CT 90%": ["ORIGINAL", "PRIMARY", "AXIAL"],
                  "AVG": ["DERIVED", "SECONDARY", "AXIAL", "AVERAGE"], "MIP": ["DERIVED", "SECONDARY", "AXIAL", "MIP"]}
        kept = [d for d, image_type in series.items()
                if route.images.skip_reason(image_type, {"SeriesDescription": d}) is None]
        assert kept == ["AVG"]

    def test_valid_mapping_round_trips(self) -> None:
        config = parse_config(_valid())
        assert config.peer_for("PACS", "10.1.2.77") is not None
        assert config.peer_for("PACS", "10.1.3.77") is None
        assert config.peer_for("OTHER", "10.1.2.77") is None


@pytest.mark.parametrize(
    ("section", "index", "key", "value", "expected"),
    [
        ("node", None, "ae_title", "A" * 17, "node.ae_title: must be 1 to 16 characters"),
        ("node", None, "ae_title", "BAD\\AE", "node.ae_title: may contain only printable ASCII"),
        ("node", None, "ae_title", " LEADING", "node.ae_title: must not start or end with a space"),
        ("node", None, "port", 70000, "node.port: Input should be less than or equal to 65535"),
        ("node", None, "bind", "example.org", "node.bind: must be an IP address"),
        ("node", None, "max_associations", 0, "node.max_associations: Input should be greater than or equal to 1"),
        ("node", None, "typo_key", 1, "node.typo_key: Extra inputs are not permitted"),
        ("peers", 0, "host", "pacs.example.org", "peers[0].host: must be an IP address or a CIDR network"),
        ("peers", 0, "quiet_seconds", 0, "peers[0].quiet_seconds: Input should be greater than or equal to 1"),
        ("peers", 0, "ae_title", "", "peers[0].ae_title: must be 1 to 16 characters"),
        ("destinations", 0, "port", 0, "destinations[0].port: Input should be greater than or equal to 1"),
        ("destinations", 0, "ae_title", "*", "destinations[0].ae_title: '*' (any AE title) is allowed only in"),
        ("routes", 0, "match", {"NotAKeyword": "CT"}, "routes[0].match: 'NotAKeyword' is not a DICOM keyword"),
        ("routes", 0, "match", {"Modality": "/[unclosed/"}, "routes[0].match: Modality: invalid regular expression"),
        ("routes", 0, "model", "../etc", "routes[0].model: must be 1-64 letters"),
        ("retention", None, "max_age_seconds", 90000, "retention.max_age_seconds: Input should be less than or "
                                                      "equal to 86400"),
    ],
)
def test_each_bad_key_gets_its_own_message(section: str, index: int | None, key: str, value: Any,
                                           expected: str) -> None:
    raw = _valid()
    target = raw[section] if index is None else raw[section][index]
    target[key] = value
    problems = _problems(raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_wildcard_is_only_for_peers() -> None:
    raw = _valid()
    raw["peers"][0]["ae_title"] = "*"
    assert parse_config(raw).peer_for("ANYONE", "10.1.2.3") is not None
    raw["destinations"][0]["ae_title"] = "*"
    assert _problems(raw)[0].startswith("destinations[0].ae_title")


def test_every_problem_is_listed_at_once() -> None:
    raw = _valid()
    raw["node"]["ae_title"] = "X" * 20
    raw["node"]["port"] = -1
    raw["peers"][0]["host"] = "nope"
    raw["retention"]["max_age_seconds"] = 10**6
    problems = _problems(raw)
    assert [p.split(":")[0] for p in problems] == ["node.ae_title", "node.port", "peers[0].host",
                                                    "retention.max_age_seconds"]


def test_cross_references_and_duplicates() -> None:
    raw = _valid()
    raw["routes"][0]["destinations"] = ["tps", "nowhere"]
    raw["peers"].append(dict(raw["peers"][0]))
    problems = _problems(raw)
    assert any("peers: name 'pacs' is used more than once" in p for p in problems)
    assert any("routes[0].destinations: 'nowhere' is not a configured destination" in p for p in problems)


def test_sweep_must_be_shorter_than_max_age() -> None:
    raw = _valid()
    raw["retention"] = {"max_age_seconds": 600, "sweep_interval_seconds": 600}
    assert "sweep_interval_seconds must be smaller than max_age_seconds" in _problems(raw)[0]


class TestCommandLine:
    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=60)

    def test_invalid_file_exits_2_listing_every_problem(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text('[node]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"\nport = 99999\n'
                        '[[peers]]\nname = "p"\nae_title = "P"\nhost = "not-an-ip"\n')
        result = self._run("serve", "--config", str(path))
        assert result.returncode == 2
        assert "node.ae_title: must be 1 to 16 characters" in result.stderr
        assert "node.port:" in result.stderr
        assert "peers[0].host:" in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""

    def test_not_toml_exits_2(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.toml"
        path.write_text("[node\nport = ")
        result = self._run("status", "--config", str(path))
        assert result.returncode == 2
        assert "not valid TOML" in result.stderr

    def test_missing_file_exits_2(self, tmp_path: Path) -> None:
        result = self._run("serve", "--config", str(tmp_path / "absent.toml"))
        assert result.returncode == 2
        assert "cannot read the file" in result.stderr


def test_the_inference_farm_needs_servers_with_distinct_names_and_mutual_tls() -> None:
    server = {"name": "gpu1", "url": "gpu1:8001", "ca_file": "ca.pem", "certificate_file": "c.pem",
              "private_key_file": "c.key"}
    with pytest.raises(ConfigError) as no_server:
        parse_config({"inference": {"backend": "triton"}})
    assert "backend 'triton' needs at least one [[inference.servers]]" in str(no_server.value)
    with pytest.raises(ConfigError) as twice:
        parse_config({"inference": {"backend": "triton", "servers": [server, server]}})
    assert "name 'gpu1' is used more than once" in str(twice.value)
    with pytest.raises(ConfigError) as plain:  # no plain-text form: the client certificate and key are required
        parse_config({"inference": {"servers": [{"name": "gpu1", "url": "gpu1:8001", "ca_file": "ca.pem"}]}})
    assert {line.split(":")[0].strip(" -") for line in str(plain.value).splitlines()[1:]} == {
        "inference.servers[0].certificate_file", "inference.servers[0].private_key_file"}
    remote = parse_config({"inference": {"remote": {"attempts": 5, "models": {"big": {"timeout_seconds": 1200}}}}})
    assert remote.inference.remote.for_model("big") == RemoteModel(timeout_seconds=1200, attempts=5)
    assert remote.inference.remote.for_model("other") == RemoteModel(timeout_seconds=600, attempts=5)
