"""The seam between the agent and whatever runs tasks.

An engine knows nothing about the broker: the agent hands it ``TaskMessage`` s
and gets ``ResultMessage`` s back through callbacks. Thread pools, process
pools and Parsl's HighThroughputExecutor all fit behind this interface.

The failure policy lives here, once: exactly one answer per task, a lost chunk
run again task by task, a task lost alone run again while it has retries, a
task's walltime, cancelling. Engines provide the primitives: run chunks, rerun
entries alone (``_rerun_alone``), and stop tasks already answered (``_stop_tasks``:
drop them if queued, kill or abandon the worker running them).
"""

from __future__ import annotations

import abc
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from farcall.endpoint.errors import WorkerLost
from farcall.endpoint.worker import failed_result, walltime_exceeded
from farcall.protocol.channel import ResultMessage, TaskMessage, parse_result_batch
from farcall.protocol.common import Attempt

log = logging.getLogger(__name__)

CHUNK_SECONDS = 0.005
"""Most work (by average task duration) an engine sends a worker as one chunk, so a task never
waits long behind others and long tasks go one by one."""


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


OnDone = Callable[[ResultMessage], None]
"""Called once per task with its result, from an engine thread: must be quick and thread-safe."""
OnStart = Callable[[str, float], None]
"""Called with ``(task_id, started_at)`` when a worker gets the task, from an engine thread."""


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


class EngineOptions(BaseModel):
    """Options every engine accepts; subclasses add their own. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    prefetch: int = Field(
        default=128,
        ge=1,
        description="tasks the endpoint asks for per worker, so workers never wait on the network",
    )


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of an engine's load, reported in heartbeats."""

    workers: int = 0
    idle_workers: int = 0
    pending_tasks: int = 0
    running_tasks: int = 0
    details: Mapping[str, Any] | None = None


WALLTIME_GRACE = 1.0
"""Seconds past a task's walltime an engine whose workers stop tasks themselves (worker
processes raise ``TaskTimeout`` inside the function) waits before it stops the worker."""
COMPACT_DEADLINES = 1024


class Engine(abc.ABC):
    """Runs tasks; calls ``on_done`` exactly once for every submitted task until ``shutdown``."""

    Options: ClassVar[type[EngineOptions]] = EngineOptions
    runs_tasks_in_agent: ClassVar[bool] = False
    """True when tasks run inside the agent's own process, so a task can kill the agent
    (the agent then keeps its crash journal; other engines lose only a worker)."""
    walltime_grace: ClassVar[float] = 0.0
    """Seconds past a task's walltime before the engine stops it (see ``WALLTIME_GRACE``)."""

    def __init__(self) -> None:
        self._live: dict[str, TaskEntry] = {}
        """Unanswered tasks by id: whoever pops an entry from here answers it (exactly once)."""
        self._deadlines: list[tuple[float, int, weakref.ref[TaskEntry], float]] = []
        """(due, seq, entry, its run's start): weak, so a finished task is not kept until its
        deadline; compacted when it doubles, so it stays about the size of the running set."""
        self._compact_at = COMPACT_DEADLINES
        self._deadline_cond = threading.Condition()
        self._deadline_seq = itertools.count()
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = False

    @classmethod
    def from_options(cls, options: EngineOptions) -> Engine:
        """Build the engine from validated options (the config's ``engine`` section)."""
        return cls(**options.model_dump())

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def start(self) -> None:
        """Start workers. Called once, before the first ``submit``."""

    @abc.abstractmethod
    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        """Queue ``task``; returns at once. Never raises for a task's own failure."""

    @abc.abstractmethod
    def status(self) -> EngineStatus:
        """Current worker and task counts (approximate; cheap enough to call every heartbeat)."""

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """How many tasks the engine wants to hold (running plus queued); may change over time."""

    def cancel_pending(self) -> list[str]:
        """Drop tasks not yet handed to a worker and return their ids (no callbacks for them).

        The agent calls this on a graceful stop: the broker hands those tasks out
        again later. Engines that cannot tell queued from running return ``[]``.
        """
        return []

    def cancel(self, task_ids: Collection[str], reason: BaseException) -> None:
        """Stop these tasks, wherever they are: drop queued ones, stop running ones (kill the
        worker process, or abandon the thread and start another). Each still gets its one
        ``on_done`` call, a failed result carrying ``reason``; unknown ids are ignored.

        Never blocks: it answers the tasks from the calling thread (``on_done`` runs inside
        this call) and leaves stopping workers to the engine's own threads.
        """
        entries = [e for e in (self._claim_id(t) for t in task_ids) if e is not None]
        if not entries:
            return
        log.info("cancelling %d task(s): %s", len(entries), reason)
        for entry in entries:
            self._deliver(entry.on_done, self._with_attempts(entry, failed_result(
                entry.task_id, reason, started_at=entry.started)))
        self._stop_tasks(entries)

    @abc.abstractmethod
    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the workers.

        ``wait=True`` lets submitted tasks finish first (up to ``timeout`` seconds);
        ``wait=False`` stops at once, abandoning unfinished tasks without callbacks.
        """

    # ------------------------------------------------ for subclasses: tasks in, answers out

    def _admit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None, *,
               payload: str = "", spec: dict[str, Any] | None = None) -> TaskEntry:
        """The entry for a submitted task, registered so that ``cancel`` finds it."""
        entry = TaskEntry(task.task_id, payload, on_done, on_start, spec,
                          task.walltime is not None, task.walltime, task.max_retries)
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
                self._watch(e, at)

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
               "lost worker.")
        )))

    @staticmethod
    def _attempt(entry: TaskEntry, at: float, error: str) -> None:
        """Keep the run just lost, and queue the task as new: alone, on no worker."""
        entry.attempts = [*(entry.attempts or ()), Attempt(at=at, error=error)]
        entry.alone = True
        entry.worker = entry.started = None

    def _rerun_alone(self, entries: list[TaskEntry]) -> None:
        """Queue ``entries`` to run again, each in a chunk of its own, ahead of new tasks.

        Engines that lose workers implement it; the others never lose a task.
        """
        raise NotImplementedError(f"{self.name} loses no workers, so it cannot rerun a task")

    def _stop_tasks(self, entries: list[TaskEntry]) -> None:
        """These tasks are answered (cancelled, timed out): drop the queued ones, and stop the
        workers running the others (kill the process, abandon the thread). Must not block."""
        raise NotImplementedError(f"{self.name} cannot stop tasks")

    # ------------------------------------------------ walltime: one watchdog thread

    def _watch(self, entry: TaskEntry, started: float) -> None:
        """Stop ``entry`` if its run that started at ``started`` is still going at its walltime."""
        assert entry.walltime is not None
        due = time.monotonic() + entry.walltime + self.walltime_grace - (time.time() - started)
        with self._deadline_cond:
            heap = self._deadlines
            if len(heap) >= self._compact_at:
                heap[:] = [d for d in heap if (e := d[2]()) is not None and not e.done]
                heapq.heapify(heap)
                self._compact_at = max(COMPACT_DEADLINES, 2 * len(heap))
            heapq.heappush(heap, (due, next(self._deadline_seq), weakref.ref(entry), started))
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, daemon=True,
                                                  name=f"farcall-walltime-{self.name}")
                self._watchdog.start()
            if heap[0][2]() is entry:
                self._deadline_cond.notify()

    def _watch_loop(self) -> None:
        cond, heap = self._deadline_cond, self._deadlines
        while True:
            with cond:
                while not self._watchdog_stop and (not heap or heap[0][0] > time.monotonic()):
                    cond.wait(heap[0][0] - time.monotonic() if heap else None)
                if self._watchdog_stop:
                    return
                _, _, ref, started = heapq.heappop(heap)
            entry = ref()
            if entry is not None and not entry.done and entry.started == started:
                try:
                    self._expire(entry)
                except Exception:  # the watchdog must outlive a bug in one engine's stop
                    log.exception("stopping task %s at its walltime failed", entry.task_id)

    def _expire(self, entry: TaskEntry) -> None:
        assert entry.walltime is not None
        if not self._claim(entry):
            return
        log.warning("task %s ran past its walltime of %g s; stopping it", entry.task_id,
                    entry.walltime)
        self._deliver(entry.on_done, self._with_attempts(entry, failed_result(
            entry.task_id, walltime_exceeded(entry.task_id, entry.walltime),
            started_at=entry.started)))
        self._stop_tasks([entry])

    def _stop_watching(self) -> None:
        """End the walltime thread (at shutdown)."""
        with self._deadline_cond:
            self._watchdog_stop = True
            self._deadline_cond.notify()
