"""The failure policy every engine shares, written once: the layer between the thin
``Engine`` interface and the engines that run tasks.

- Exactly one answer per task: whoever takes a task out of ``_live`` answers it (its
  result, a cancel, a timeout, a loss); any later answer is dropped.
- A chunk lost with its worker runs again task by task, costing none of its tasks'
  retries (any of them may have killed the worker); a task lost alone runs again while
  it has ``max_retries``, then fails with ``WorkerLost``. Every lost run is kept as an
  ``Attempt``.
- A task past its walltime is answered with ``TaskTimeout`` and stopped
  (``watchdog.WalltimeWatchdog`` keeps the clock).
- ``cancel`` answers at once, then stops what it answered.

Engines provide the primitives: run chunks, rerun entries alone (``_rerun_alone``),
and stop tasks already answered (``_stop_tasks``: drop them if queued, kill or
abandon the worker running them).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field, field_validator

from farcall.endpoint.engines.base import Engine, EngineOptions, OnDone, OnStart
from farcall.endpoint.engines.serializers import parse_allowlist
from farcall.endpoint.engines.watchdog import WalltimeWatchdog
from farcall.endpoint.errors import WorkerLost
from farcall.endpoint.outcomes import failed_result, walltime_exceeded
from farcall.protocol.channel import ResultMessage, TaskMessage, parse_result_batch
from farcall.protocol.common import Attempt

log = logging.getLogger(__name__)

CHUNK_SECONDS = 0.005
"""Most work (by average task duration) an engine sends a worker as one chunk, so a task never
waits long behind others and long tasks go one by one."""
WALLTIME_GRACE = 1.0
"""Seconds past a task's walltime an engine whose workers stop tasks themselves (worker
processes raise ``TaskTimeout`` inside the function) waits before it stops the worker."""


class TaskDurations:
    """A running average of how long tasks take in the worker, from their results."""

    def __init__(self) -> None:
        self.mean: float | None = None

    def add(self, results: list[ResultMessage]) -> None:
        took = [r.finished_at - r.started_at for r in results
                if r.started_at is not None and r.finished_at is not None]
        if took:
            mean = sum(took) / len(took)
            self.mean = mean if self.mean is None else 0.8 * self.mean + 0.2 * mean

    def chunk_size(self, limit: int) -> int:
        """Tasks per chunk for about CHUNK_SECONDS of work (1 while durations are unknown)."""
        if not self.mean:
            return 1 if self.mean is None else limit
        return max(1, min(limit, int(CHUNK_SECONDS / self.mean)))


@dataclass(slots=True, eq=False, weakref_slot=True)
class TaskEntry:
    """A submitted task as an engine holds it, from ``submit`` to its one answer."""

    task_id: str
    payload: str
    """The ``TaskMessage`` JSON, made once at submit and sent as it is ("" for threads)."""
    on_done: OnDone
    on_start: OnStart | None = None
    spec: dict[str, Any] | None = None
    """The task's resource specification, for engines that place tasks by it."""
    alone: bool = False
    """Set when the task must travel in a chunk of its own: it has a walltime (stopping
    its worker then costs no other task), or it shared a lost chunk."""
    walltime: float | None = None
    max_retries: int = 0
    task: TaskMessage | None = None
    """The task itself, for engines that run it in this process."""
    worker: Any = None
    """The engine's handle of the worker running it; None while queued."""
    started: float | None = None
    """When its current run started (``time.time()``); None while queued."""
    attempts: list[Attempt] | None = None
    """Earlier runs that a lost worker cut short; None until the first (the usual case)."""
    lost_alone: int = 0
    """Runs lost alone with their worker: those count against ``max_retries``."""
    done: bool = False
    """Answered: the engine skips it if still queued and drops any later result."""
    user: str = ""
    """Who submitted it (``TaskMessage.user_id``): engines that keep users apart place it by it."""


class PolicyOptions(EngineOptions):
    """``engine:`` keys of the policy every engine shares (Globus Compute's names)."""

    max_retries_on_system_failure: int = Field(
        default=0, ge=0, description="runs again of a task lost with its worker (a crash, a node "
                                     "lost), for every task, beyond the task's own max_retries")
    allowed_serializers: list[str] | None = Field(
        default=None, description="Globus Compute serialization strategies whose payloads this "
                                  "endpoint accepts (engines/serializers.py); None: all")

    @field_validator("allowed_serializers", mode="before")
    @classmethod
    def _check_allowlist(cls, value: Any) -> Any:
        parse_allowlist(value)  # records its problems; a bad list is never used
        return value if not isinstance(value, str) else None


class PolicyEngine(Engine):
    """An engine under the one failure policy (this module's docstring); engines subclass it."""

    walltime_grace: ClassVar[float] = 0.0
    """Seconds past a task's walltime before the engine stops it (see ``WALLTIME_GRACE``)."""

    def __init__(self, max_retries_on_system_failure: int = 0,
                 allowed_serializers: Sequence[str] | None = None) -> None:
        self.max_retries_on_system_failure = max_retries_on_system_failure
        """Runs again of any task lost with its worker, when the task asks for fewer."""
        self.allowlist = parse_allowlist(allowed_serializers)
        self._live: dict[str, TaskEntry] = {}
        """Unanswered tasks by id: whoever pops an entry from here answers it (exactly once)."""
        self._watchdog: WalltimeWatchdog[TaskEntry] = WalltimeWatchdog(
            self._expire, grace=self.walltime_grace, name=self.name)

    def cancel(self, task_ids: Collection[str], reason: BaseException) -> None:
        entries = [e for e in (self._claim_id(t) for t in task_ids) if e is not None]
        if not entries:
            return
        log.info("cancelling %d task(s): %s", len(entries), reason)
        for entry in entries:
            self._deliver(entry.on_done, self._with_attempts(entry, failed_result(
                entry.task_id, reason, started_at=entry.started)))
        self._stop_tasks(entries)

    # ------------------------------------------------ for subclasses: what they must do

    def _rerun_alone(self, entries: list[TaskEntry]) -> None:
        """Queue ``entries`` to run again, each in a chunk of its own, ahead of new tasks.

        Engines that lose workers implement it; the others never lose a task.
        """
        raise NotImplementedError(f"{self.name} loses no workers, so it cannot rerun a task")

    @abc.abstractmethod
    def _stop_tasks(self, entries: list[TaskEntry]) -> None:
        """These tasks are answered (cancelled, timed out): drop the queued ones, and stop the
        workers running the others (kill the process, abandon the thread). Must not block."""

    # ------------------------------------------------ for subclasses: tasks in, answers out

    def _refuse(self, task: TaskMessage, on_done: OnDone) -> bool:
        """Answer ``task`` at once with a failure, and return True, if this engine may not run
        it (``allowed_serializers``); engines call it first in ``submit``."""
        why = self.allowlist.refusal(task) if self.allowlist is not None else None
        if why is None:
            return False
        log.warning("refusing task %s: %s", task.task_id, why)
        self._deliver(on_done, failed_result(task.task_id, why))
        return True

    def _admit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None, *,
               payload: str = "", spec: dict[str, Any] | None = None) -> TaskEntry:
        """The entry for a submitted task, registered so that ``cancel`` finds it. A task lost
        with its worker runs again up to its ``max_retries`` or the engine's
        ``max_retries_on_system_failure``, whichever is more."""
        retries = max(task.max_retries, self.max_retries_on_system_failure)
        entry = TaskEntry(task.task_id, payload, on_done, on_start, spec,
                          task.walltime is not None, task.walltime, retries,
                          user=task.user_id)
        if self._live.setdefault(task.task_id, entry) is not entry:
            raise ValueError(f"task {task.task_id} is already in {self.name}; submit each task "
                             "once and again only after its result")
        return entry

    def _claim(self, entry: TaskEntry) -> bool:
        """True once per entry, for whoever answers it (atomic: one dict pop)."""
        if self._live.pop(entry.task_id, None) is entry:
            entry.done = True
            return True
        return False

    def _claim_id(self, task_id: str) -> TaskEntry | None:
        entry = self._live.pop(task_id, None)
        if entry is not None:
            entry.done = True
        return entry

    def _forget(self, entries: Collection[TaskEntry]) -> list[str]:
        """Drop queued ``entries`` without an answer (``cancel_pending``); returns their ids."""
        return [e.task_id for e in entries if self._claim(e)]

    def _started(self, entries: list[TaskEntry], at: float, worker: Any = None) -> None:
        """``entries`` started on ``worker`` at ``at``: tell the agent, and start the walltime
        clock of the one that has a walltime (such a task travels alone)."""
        for e in entries:
            e.started = at
            e.worker = worker
            if e.on_start is not None:
                try:
                    e.on_start(e.task_id, at)
                except Exception:
                    log.exception("start callback failed for task %s", e.task_id)
            if e.walltime is not None:
                self._watchdog.watch(e, at)

    def _finish(self, entry: TaskEntry, result: ResultMessage) -> None:
        """Answer ``entry`` with ``result`` unless it was answered already (cancelled, timed out)."""
        if self._claim(entry):
            self._deliver(entry.on_done, self._with_attempts(entry, result))

    @staticmethod
    def _with_attempts(entry: TaskEntry, result: ResultMessage) -> ResultMessage:
        if entry.attempts:
            result.attempts = list(entry.attempts)
        return result

    def _deliver(self, on_done: OnDone, result: ResultMessage) -> None:
        """Hand ``result`` to the agent; a failing callback is logged, never raised into the engine."""
        try:
            on_done(result)
        except Exception:
            log.exception("result callback failed for task %s", result.task_id)

    def _deliver_chunk(self, chunk: list[TaskEntry], raw: bytes | str) -> list[ResultMessage]:
        """Deliver the results of ``chunk`` from ``worker.run_batch``'s answer; returns them."""
        results = parse_result_batch(raw)
        for entry, result in zip(chunk, results, strict=True):
            self._finish(entry, result)
        return results

    # ------------------------------------------------ for subclasses: losses

    def _lost(self, chunk: list[TaskEntry], lost_with: str) -> None:
        """The worker running ``chunk`` is gone; ``lost_with`` says which and how, for the user.

        Any task of a chunk may have killed it, so a chunk runs again task by task, and that
        costs none of their retries. A task lost alone runs again (alone) while it has
        retries (``max_retries``), then fails with ``WorkerLost``. Every lost run is kept as
        an ``Attempt``. Answered tasks (cancelled, timed out) are not run again.
        """
        live = [e for e in chunk if not e.done]
        now = time.time()
        if len(chunk) > 1:
            log.warning("lost a chunk of %d tasks with %s; running each alone", len(chunk), lost_with)
            for entry in live:
                self._attempt(entry, now, (
                    f"WorkerLost: task {entry.task_id} was lost with {lost_with}, in a chunk of "
                    f"{len(chunk)} tasks; running it again alone (any task of the chunk may have "
                    "caused it, so this costs none of its retries)"))
            if live:
                self._rerun_alone(live)
            return
        if not live:
            return
        (entry,) = live
        entry.lost_alone += 1
        if entry.lost_alone <= entry.max_retries:
            log.warning("lost task %s with %s; running it again (retry %d of %d)",
                        entry.task_id, lost_with, entry.lost_alone, entry.max_retries)
            self._attempt(entry, now, (
                f"WorkerLost: task {entry.task_id} was lost with {lost_with}; running it again "
                f"(retry {entry.lost_alone} of {entry.max_retries})"))
            self._rerun_alone([entry])
            return
        log.warning("lost task %s with %s", entry.task_id, lost_with)
        runs = 1 + len(entry.attempts or ())
        self._finish(entry, failed_result(entry.task_id, WorkerLost(
            f"task {entry.task_id} was lost with {lost_with}"
            + (f", in the last of its {runs} runs (max_retries={entry.max_retries}): every run "
               "lost its worker" if runs > 1 else " (it ran once; max_retries=0)")
            + ". The function may have crashed the worker (segfault, os._exit, "
            "out of memory), or the worker was stopped from outside (killed, or its block ended "
            "at walltime or scale-in); check the endpoint's log and the machine's memory, then "
            "submit the task again"
            + ("." if entry.max_retries else ", or with max_retries= to run it again after a "
               "lost worker (for every task: the engine's max_retries_on_system_failure).")
        )))

    @staticmethod
    def _attempt(entry: TaskEntry, at: float, error: str) -> None:
        """Keep the run just lost, and queue the task as new: alone, on no worker."""
        entry.attempts = [*(entry.attempts or ()), Attempt(at=at, error=error)]
        entry.alone = True
        entry.worker = entry.started = None

    # ------------------------------------------------ walltime

    def _expire(self, entry: TaskEntry) -> None:
        """The watchdog's call: ``entry`` outlived its walltime; answer it, then stop it."""
        assert entry.walltime is not None
        if not self._claim(entry):
            return
        log.warning("task %s ran past its walltime of %g s; stopping it", entry.task_id,
                    entry.walltime)
        self._deliver(entry.on_done, self._with_attempts(entry, failed_result(
            entry.task_id, walltime_exceeded(entry.task_id, entry.walltime),
            started_at=entry.started)))
        self._stop_tasks([entry])
