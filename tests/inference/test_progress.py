"""Progress in the logs: expected inference time from the last run, remaining time while it runs."""

from __future__ import annotations

import time

from structlog.testing import capture_logs

from gateway.inference.manifest import load_model_package
from gateway.inference.predictor import Predictor
from gateway.inference.progress import InferenceProgress, SpeedMemory
from tests.conftest import REPO
from tests.synthetic import couch_phantom


def test_expected_seconds_come_from_the_last_run_of_the_model() -> None:
    speed = SpeedMemory()
    assert speed.expect("default", 100) is None
    speed.remember("default", 50, 2.0)
    assert speed.expect("default", 100) == 4.0
    assert speed.expect("liver", 100) is None


def test_the_predictor_reports_every_batch_and_progress_says_what_remains() -> None:
    volume, _ = couch_phantom(shape=(30, 160, 160), spacing=(4.0, 2.6, 2.6))
    calls: list[tuple[int, int]] = []
    Predictor(load_model_package(REPO / "models" / "default")).predict(volume, lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
    progress = InferenceProgress(interval=0.0)
    time.sleep(0.01)
    with capture_logs() as logs:
        progress(1, 4)
        progress(4, 4)  # the end is the stage's own event
    [event] = logs
    assert (event["event"], event["tiles_done"], event["tiles"]) == ("inference_progress", 1, 4)
    assert event["remaining_seconds"] >= 0
