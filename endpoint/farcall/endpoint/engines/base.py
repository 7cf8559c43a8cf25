"""The seam between the agent and whatever runs tasks.

An engine knows nothing about the broker: the agent hands it ``TaskMessage`` s
and gets ``ResultMessage`` s back through callbacks. Thread pools, process
pools and Parsl's HighThroughputExecutor all fit behind this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from farcall.messages import ResultMessage, TaskMessage

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
