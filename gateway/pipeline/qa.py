"""Contour QA in the structure stage: check every structure, keep the record, and apply the route's ``qa`` mode.

``annotate`` (the default) sends every structure, the findings written in the RTSTRUCT; ``hold`` keeps the whole
study from being sent when a check of any of its series fails (that series ``held`` with reason ``qa_failed`` and an
alert, the others ``held`` with reason ``study_held``) until ``python -m gateway release``; ``drop`` leaves the
structures that failed a check out. Whatever the mode, each flag is logged, every outcome counted in the metrics,
the series' record stored for ``status`` and ``python -m gateway qa``, and one audit record written: structure
names, check and reason codes and figures only, never patient data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from gateway.inference.confidence import Confidence
from gateway.inference.labels import MaskView
from gateway.inference.manifest import ModelManifest
from gateway.inference.volume import Volume
from gateway.ops.audit import AuditLog
from gateway.ops.metrics import Metrics
from gateway.routes import Route
from gateway.rt.plausibility import Finding, Outcome, check_structures
from gateway.store.jobs import JobStore
from gateway.store.qa_records import QaRecord, QaRecords

__all__ = ["ContourQa", "QaVerdict"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class QaVerdict:
    """What QA found for one series and what the route's mode makes of it."""

    findings: list[Finding]
    masks: Mapping[str, np.ndarray]  # the structures to write (``drop``: without those that failed)
    dropped: list[str]  # label names left out
    held: bool  # ``hold`` and a check failed: nothing is sent until released

    @property
    def failed(self) -> list[str]:
        """Label names with a failed check, in order of the findings."""
        return list(dict.fromkeys(f.structure for f in self.findings if f.outcome is Outcome.FAIL))

    def count(self, outcome: Outcome) -> int:
        """How many checks ended with *outcome*."""
        return sum(f.outcome is outcome for f in self.findings)


class ContourQa:
    """Runs the checks of one series and records them; shared by the runner's worker threads."""

    def __init__(self, jobs: JobStore, audit: AuditLog, metrics: Metrics | None, clock: Callable[[], float]) -> None:
        self._jobs = jobs
        self._records = QaRecords(jobs)
        self._audit = audit
        self._metrics = metrics
        self._clock = clock

    def check(self, job_id: str, task_no: int, route: Route, volume: Volume, masks: Mapping[str, np.ndarray],
              manifest: ModelManifest, confidence: Mapping[str, Confidence] | None = None,
              split_mm: Mapping[str, float] | None = None) -> QaVerdict:
        """Check every structure of the series, record the outcome, and decide what the route's mode does."""
        findings = check_structures(volume, masks, manifest, confidence, split_mm)
        verdict = _verdict(route, findings, masks)
        self._report(findings)
        self._records.replace(job_id, task_no, [QaRecord(task_no, f.structure, f.check, f.outcome.value, f.value,
                                                         f.reason) for f in findings])
        self._audit.append("qa_checked", self._clock(), job_id=job_id, study=self._jobs.get(job_id).study,
                           series=task_no, mode=route.qa, checks=len(findings), warnings=verdict.count(Outcome.WARN),
                           failures=verdict.count(Outcome.FAIL), held=verdict.held, dropped=verdict.dropped,
                           flagged=_flagged(findings))
        return verdict

    def _report(self, findings: Sequence[Finding]) -> None:
        for finding in findings:
            if finding.outcome is not Outcome.PASS:
                log.warning("qa_flagged", structure=finding.structure, check=finding.check,
                            outcome=finding.outcome.value, reason=finding.reason, value=finding.value)
            if self._metrics is not None:
                self._metrics.qa_check(finding.check, finding.outcome.value)


def _verdict(route: Route, findings: list[Finding], masks: Mapping[str, np.ndarray]) -> QaVerdict:
    failed = {f.structure for f in findings if f.outcome is Outcome.FAIL}
    if route.qa == "drop" and failed:
        dropped = [name for name in masks if name in failed]
        kept = MaskView({name: functools.partial(masks.__getitem__, name) for name in masks if name not in failed})
        return QaVerdict(findings, kept, dropped, held=False)
    return QaVerdict(findings, masks, [], held=route.qa == "hold" and bool(failed))


def _flagged(findings: Sequence[Finding]) -> list[dict[str, object]]:
    return [{"structure": f.structure, "check": f.check, "outcome": f.outcome.value, "reason": f.reason,
             "value": f.value} for f in findings if f.outcome is not Outcome.PASS]
