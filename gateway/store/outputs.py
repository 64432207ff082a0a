"""Sealed stage outputs: what one stage hands the next, sealed under the job's key, by task and kind.

Every stage output goes through here: the pseudonymised instances (``work/``), and per task the
masks, the pseudonymised results (``pseudo<i>``), the QA picture and the re-identified outbox
(``out<i>``) under ``results/``. A stage interrupted by a crash is redone from its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.store.jobs import JobStore
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool
from gateway.store.tasks import TaskStore

__all__ = ["StageContext", "load_output", "load_outputs", "load_received", "load_work", "output_name", "save_output",
           "save_outputs", "save_work"]


@dataclass(frozen=True)
class StageContext:
    """What every stage works with: the spool, the job database and the sealer."""

    spool: Spool
    jobs: JobStore
    sealer: Sealer

    @property
    def tasks(self) -> TaskStore:
        """The task rows of the same database."""
        return TaskStore(self.jobs)


def output_name(task_no: int, kind: str) -> str:
    """The spool name of a task's stage output (``masks``, ``qa-png``, ``pseudo0``, ``out0`` ...)."""
    return f"t{task_no}.{kind}"


def save_output(ctx: StageContext, job_id: str, task_no: int, kind: str, data: bytes) -> None:
    """Seal *data* and store it as the task's output *kind* (replacing an earlier one)."""
    ctx.spool.write_result(job_id, output_name(task_no, kind), ctx.sealer.seal(job_id, Purpose.RESULT, [data]))


def load_output(ctx: StageContext, job_id: str, task_no: int, kind: str) -> bytes:
    """The plaintext of the task's output *kind*; ``FileNotFoundError`` if there is none."""
    return ctx.sealer.open(job_id, Purpose.RESULT, ctx.spool.read_result(job_id, output_name(task_no, kind)))


def save_outputs(ctx: StageContext, job_id: str, task_no: int, prefix: str, items: Sequence[bytes]) -> None:
    """Store each of *items* as ``<prefix><index>``."""
    for index, data in enumerate(items):
        save_output(ctx, job_id, task_no, f"{prefix}{index}", data)


def load_outputs(ctx: StageContext, job_id: str, task_no: int, prefix: str) -> list[bytes]:
    """What :func:`save_outputs` stored under *prefix*, in order."""
    items: list[bytes] = []
    while True:
        try:
            items.append(load_output(ctx, job_id, task_no, f"{prefix}{len(items)}"))
        except FileNotFoundError:
            return items


def save_work(ctx: StageContext, job_id: str, data: bytes) -> str:
    """Seal one pseudonymised instance into ``work/``; return its file id."""
    return ctx.spool.write_work(job_id, ctx.sealer.seal(job_id, Purpose.PSEUDONYMISED, [data]))


def load_work(ctx: StageContext, job_id: str, file_id: str) -> bytes:
    """The plaintext of a pseudonymised instance stored by :func:`save_work`."""
    return ctx.sealer.open(job_id, Purpose.PSEUDONYMISED, ctx.spool.read_work(job_id, file_id))


def load_received(ctx: StageContext, job_id: str, file_id: str) -> bytes:
    """The plaintext of a received instance, as the receiver sealed it."""
    return ctx.sealer.open(job_id, Purpose.RECEIVED, ctx.spool.read_instance(job_id, file_id))
