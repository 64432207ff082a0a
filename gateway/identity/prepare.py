"""Pseudonymisation ahead of time: a study's instances read and pseudonymised in memory while the rest arrive.

The pseudonymise stage (:func:`gateway.identity.stages.pseudonymise_job`) still runs when the study is complete
and still decides everything from the job table: which instances, which series, which routes, what is
quarantined. What :class:`Preparer` did ahead (between bursts of arriving instances, and in the quiet period that
completes a study) only spares it reading and pseudonymising the instances it had already seen, made with the UID
map and pseudonym the stage then carries on with. Nothing is written before the
stage runs, so a crash loses only the head start. A study whose instances changed after they were prepared (a
corrected re-send replaced one) is pseudonymised from the start with a fresh UID map: the vault never holds a UID
of an instance that is no longer part of the study. Memory is bounded (``[pipeline] prepare_mb``); what does not
fit is left to the stage.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.errors import PixelDataError
from gateway.identity.pseudonymise import (
    DEFAULT_UNWANTED_IMAGE_TYPES,
    UIDMap,
    encode,
    identity_of,
    new_pseudonym,
    patient_of,
    pseudonymise,
    quarantine_reason,
)
from gateway.routes import Route
from gateway.store.outputs import StageContext, load_received

__all__ = ["NO_ROUTE", "PreparedInstance", "PreparedJob", "Preparer", "prepare_instance", "route_for"]

log = structlog.get_logger(__name__)

NO_ROUTE = "no_route"


def route_for(ds: Dataset, routes: Sequence[Route]) -> tuple[Route | None, str | None]:
    """The first route that takes the series of *ds*, or ``None`` and why none does.

    A route takes a series when its ``match`` fits (multi-valued attributes joined by ``\\``)
    and its ``[routes.images]`` does not skip it; the reason is the first skip's code, else ``no_route``.
    """
    skipped = None
    for route in routes:
        attributes = {}
        for keyword in route.keywords:
            value = ds.get(keyword)
            if value is not None:
                attributes[keyword] = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
        if not route.matches(attributes):
            continue
        image_type = [str(v) for v in ds.get("ImageType", [])]
        reason = route.images.skip_reason(image_type, attributes)
        if reason is None:
            return route, None
        skipped = skipped or reason
    return None, skipped or NO_ROUTE


@dataclass(frozen=True)
class PreparedInstance:
    """What the pseudonymise stage needs of one received instance."""

    patient: tuple[bytes, ...]
    series_uid: str
    identity: bytes  # the identity attributes as received (the stage keeps the first of each series)
    quarantine: str | None  # why it must not be processed (decided before routing), else None
    route: Route | None
    route_reason: str | None  # why no route takes its series
    encoded: bytes | None  # the pseudonymised instance; None when quarantined or undecodable
    undecodable: bool = False  # routed, but its pixel data could not be rewritten


@dataclass
class PreparedJob:
    """The instances of one study prepared so far, and the UID map and pseudonym they were made with."""

    uids: UIDMap = field(default_factory=UIDMap)
    pseudonym: str = field(default_factory=new_pseudonym)
    files: dict[str, PreparedInstance] = field(default_factory=dict)
    size: int = 0  # bytes of pseudonymised instances held


def prepare_instance(ctx: StageContext, job_id: str, file_id: str, uids: UIDMap, pseudonym: str,
                     routes: Sequence[Route],
                     unwanted_image_types: Iterable[str] = DEFAULT_UNWANTED_IMAGE_TYPES) -> PreparedInstance:
    """Read one received instance, judge it, route it, and pseudonymise it unless it is to be quarantined."""
    ds = pydicom.dcmread(io.BytesIO(load_received(ctx, job_id, file_id)))
    patient, series_uid, identity = patient_of(ds), str(ds.get("SeriesInstanceUID", "")), identity_of(ds)
    reason = quarantine_reason(ds, unwanted_image_types)
    if reason is not None:
        return PreparedInstance(patient, series_uid, identity, reason, None, None, None)
    route, route_reason = route_for(ds, routes)
    try:
        encoded = encode(pseudonymise(ds, uids, pseudonym))
    except PixelDataError:
        return PreparedInstance(patient, series_uid, identity, None, route, route_reason, None, undecodable=True)
    return PreparedInstance(patient, series_uid, identity, None, route, route_reason, encoded)


class Preparer:
    """Prepares the instances of the studies that wait for the pseudonymise stage, one instance at a time.

    :meth:`step` is called repeatedly (the runner's preparer thread); :meth:`take` hands a study's preparation to
    its stage, after which it is never touched again by the preparer (until the study is received anew).
    """

    def __init__(self, ctx: StageContext, routes: Sequence[Route], limit_bytes: int) -> None:
        self._ctx = ctx
        self._routes = routes
        self._limit = limit_bytes
        self._jobs: dict[str, PreparedJob] = {}
        self._left: set[str] = set()  # taken by the stage, or left to it after an error
        self._lock = threading.Lock()  # held while one instance is prepared, and by take()
        self._size = 0
        self._closed = False

    @property
    def size(self) -> int:
        """Bytes of pseudonymised instances held now."""
        return self._size

    def step(self, waiting: Sequence[str], busy: Callable[[], bool] = lambda: False) -> int:
        """Prepare what arrived since the last step of the jobs *waiting* for the pseudonymise stage (oldest
        first), within the memory limit, and forget every other job. Return how many instances were prepared.

        *busy* is asked before each instance: while it says so (instances are arriving in a burst), the step ends,
        leaving the processor to the receivers.
        """
        with self._lock:
            self._forget(set(waiting))
        prepared = 0
        for job_id in waiting:
            if job_id in self._left:
                continue
            for file_id in sorted(self._ctx.jobs.instance_files(job_id)):  # a database error ends the step only
                if busy():
                    return prepared
                try:
                    outcome = self._prepare(job_id, file_id)
                except Exception as exc:  # the stage reads it again and reports what is wrong
                    log.warning("prepare_skipped", job_id=job_id, reason=type(exc).__name__)
                    self.take(job_id)
                    break
                if outcome is None:
                    break
                prepared += outcome
            if self._size >= self._limit:
                break
        return prepared

    def _prepare(self, job_id: str, file_id: str) -> int | None:
        """1 if *file_id* was prepared now, 0 if it already was, None if the job is not to be prepared further."""
        with self._lock:
            if self._closed or job_id in self._left or self._size >= self._limit:
                return None
            job = self._jobs.setdefault(job_id, PreparedJob())
            if file_id in job.files:
                return 0
            item = prepare_instance(self._ctx, job_id, file_id, job.uids, job.pseudonym, self._routes)
            job.files[file_id] = item
            job.size += len(item.encoded or b"")
            self._size += len(item.encoded or b"")
            return 1

    def close(self) -> None:
        """Stop preparing (after the instance being prepared now) and let go of everything prepared."""
        with self._lock:
            self._closed = True
            self._jobs.clear()
            self._size = 0

    def take(self, job_id: str) -> PreparedJob | None:
        """What was prepared of *job_id*, for its stage; the preparer leaves the job alone from now on."""
        with self._lock:
            self._left.add(job_id)
            job = self._jobs.pop(job_id, None)
            if job is not None:
                self._size -= job.size
            return job

    def _forget(self, waiting: set[str]) -> None:
        for job_id in [job_id for job_id in self._jobs if job_id not in waiting]:
            self._size -= self._jobs.pop(job_id).size  # shredded, failed, or pseudonymised
        self._left &= waiting  # received anew after it left the waiting ones: prepared again
