"""The seam between the agent and whatever runs tasks.

An engine knows nothing about the broker: the agent hands it ``TaskMessage`` s
and gets ``ResultMessage`` s back through callbacks. Thread pools, process
pools and Parsl's HighThroughputExecutor all fit behind this interface.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from farcall.endpoint.errors import WorkerLost
from farcall.endpoint.worker import failed_result
from farcall.messages import ResultMessage, TaskMessage, parse_result_batch

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


@dataclass(slots=True)
class TaskEntry:
    """A submitted task as an engine that ships tasks to other processes holds it."""

    task_id: str
    payload: str
    """The ``TaskMessage`` JSON, made once at submit and sent as it is."""
    on_done: OnDone
    on_start: OnStart | None = None
    spec: dict[str, Any] | None = None
    """The task's resource specification, for engines that place tasks by it."""
    alone: bool = False
    """Set when the task must travel in a chunk of its own (it shared a lost one)."""


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


class Engine(abc.ABC):
    """Runs tasks; calls ``on_done`` exactly once for every submitted task until ``shutdown``."""

    Options: ClassVar[type[EngineOptions]] = EngineOptions

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

    @abc.abstractmethod
    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the workers.

        ``wait=True`` lets submitted tasks finish first (up to ``timeout`` seconds);
        ``wait=False`` stops at once, abandoning unfinished tasks without callbacks.
        """

    # ------------------------------------------------ for subclasses: results and losses

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
            self._deliver(entry.on_done, result)
        return results

    def _lost(self, chunk: list[TaskEntry], lost_with: str) -> None:
        """The worker running ``chunk`` is gone; ``lost_with`` says which and how, for the user.

        Any task of a chunk may have killed it, so a chunk runs again task by task and
        only the culprit, lost alone, fails with ``WorkerLost``.
        """
        if len(chunk) > 1:
            log.warning("lost a chunk of %d tasks with %s; running each alone", len(chunk), lost_with)
            for entry in chunk:
                entry.alone = True
            self._rerun_alone(chunk)
            return
        (entry,) = chunk
        log.warning("lost task %s with %s", entry.task_id, lost_with)
        self._deliver(entry.on_done, failed_result(entry.task_id, WorkerLost(
            f"task {entry.task_id} was lost with {lost_with}. The function may have crashed "
            "the worker (segfault, os._exit, out of memory), or the worker was stopped from "
            "outside (killed, or its block ended at walltime or scale-in); check the endpoint's "
            "log and the machine's memory, then submit the task again."
        )))

    def _rerun_alone(self, entries: list[TaskEntry]) -> None:
        """Queue ``entries`` to run again, each in a chunk of its own, ahead of new tasks.

        Engines that send tasks in chunks implement it; the others never lose a chunk.
        """
        raise NotImplementedError(f"{self.name} sends no chunks, so it cannot rerun one")
