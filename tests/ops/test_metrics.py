"""Prometheus metrics after a real study went through, and /healthz turning unhealthy when receiving stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NodeProcess, canaries, dcmtk_env, require_tool
from tests.receiving.test_receive import receiver_pids
from tests.synthetic import couch_phantom, write_volume_series

ROUTE = {"name": "thorax", "match": {"Modality": "CT"}, "model": "default", "destinations": ["folder"]}


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(port, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def test_metrics_after_a_study_and_health(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    volume, _ = couch_phantom(shape=(30, 160, 160), spacing=(4.0, 2.6, 2.6))
    ct = write_volume_series(tmp_path / "ct", volume)
    node = node_factory(destinations=[{"name": "folder", "type": "folder"}], routes=[ROUTE])
    port = int(node.wait_for("node_started")["metrics_port"])
    sent = subprocess.run([require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                           str(node.port), *map(str, ct.files)], capture_output=True, env=dcmtk_env(), timeout=60)
    assert sent.returncode == 0
    node.wait_for("job_shredded", timeout=180)
    # The shredder logs job_shredded, then counts it: read the metrics once the count is in.
    shredded = ("gateway_retention_shredded_total", (("why", "delivered"),))
    deadline = time.monotonic() + 30
    while (samples := _samples(port)).get(shredded, 0) < 1:
        assert time.monotonic() < deadline, "job_shredded was logged but never counted"
        time.sleep(0.1)
    assert samples[("gateway_associations_total", (("outcome", "accepted"),))] == 1
    assert samples[("gateway_instances_total", (("outcome", "stored"),))] == 30
    assert samples[("gateway_instances_total", (("outcome", "refused"),))] == 0
    for stage in ("pseudonymise", "infer", "structure", "reidentify", "send"):
        assert samples[("gateway_stage_duration_seconds_count", (("stage", stage),))] == 1, stage
    assert samples[("gateway_deliveries_total", (("destination", "folder"), ("outcome", "sent")))] == 1
    qa = {labels: value for (name, labels), value in samples.items() if name == "gateway_qa_checks_total"}
    assert sum(qa.values()) >= 3 and {dict(labels)["check"] for labels in qa} >= {"volume", "inside_external"}
    assert samples[shredded] == 1
    assert 0 < samples[("gateway_oldest_data_age_seconds", ())] < 600  # the folder export, until its deadline
    assert samples[("gateway_max_age_seconds", ())] == 86_400
    assert samples[("gateway_disk_free_bytes", ())] > 0
    status, body = _get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    exposition = _get(port, "/metrics")[1].decode()
    assert not [canary for canary in canaries(ct) if canary in exposition]


def test_healthz_is_unhealthy_while_no_receiver_runs(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory()
    port = int(node.wait_for("node_started")["metrics_port"])
    assert _get(port, "/healthz")[0] == 200
    assert len(receiver_pids(node)) == 4
    # Kill every receiver until none runs. A receiver that dies within 5 s of its start is replaced only after a
    # crash-loop pause, while one that ran longer (the first ones, on a busy machine) is replaced at once: killing
    # the replacements too makes the pause, during which no receiver runs, happen whatever the machine's speed.
    deadline = time.monotonic() + 60
    while True:
        for pid in receiver_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        status, body = _get(port, "/healthz")
        if status != 200:
            break
        assert time.monotonic() < deadline, "/healthz stayed 200 with every receiver killed"
        time.sleep(0.1)
    assert status == 503
    assert json.loads(body)["checks"]["scp_accepting"] is False
    assert node.wait_for("receiver_process_died")["exitcode"] == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while _get(port, "/healthz")[0] != 200:  # replaced after the crash-loop pause
        assert time.monotonic() < deadline, "the node did not recover"
        time.sleep(0.5)
