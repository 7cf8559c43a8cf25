"""The seam between the agent and whatever runs tasks.

An engine knows nothing about the broker: the agent hands it ``TaskMessage`` s
and gets ``ResultMessage`` s back through callbacks. Thread pools, process
pools and Parsl's HighThroughputExecutor all fit behind this interface; the
failure policy they share (one answer per task, lost workers, walltimes,
cancelling) is ``policy.PolicyEngine``, beside it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from farcall.endpoint import problems
from farcall.protocol.channel import ResultMessage, TaskMessage

OnDone = Callable[[ResultMessage], None]
"""Called once per task with its result, from an engine thread: must be quick and thread-safe."""
OnStart = Callable[[str, float], None]
"""Called with ``(task_id, started_at)`` when a worker gets the task, from an engine thread."""


GLOBUS_KEYS: dict[str, str] = {
    "endpoint_id": "farcall's endpoint id comes from its registration (endpoint.json); this "
                   "key is ignored",
    "working_dir": "farcall runs each task in its worker's current directory (a process pool's "
                   "workers: the agent's; a Parsl block's: the job's) and makes no task "
                   "directory; a function that needs one can os.chdir itself",
    "run_in_sandbox": "farcall makes no directory per task (and sets no GC_TASK_SANDBOX_DIR); a "
                      "function that needs one can make it (tempfile.mkdtemp) and os.chdir there",
}
"""Keys of every Globus Compute engine that farcall takes without acting on them: what farcall
does instead (each is one WARNING when the config is read)."""


class EngineOptions(BaseModel):
    """Options every engine accepts; subclasses add their own. Unknown keys are errors.

    A Globus Compute key the engine does not act on (``GLOBUS_KEYS``, and the class's own
    ``globus_keys``) is taken with one warning that says what farcall does instead.
    """

    model_config = ConfigDict(extra="forbid")
    globus_keys: ClassVar[dict[str, str]] = {}
    """This engine's own Globus Compute keys that it takes without acting on them."""

    prefetch: int = Field(
        default=128,
        ge=1,
        description="tasks the endpoint asks for per worker, so workers never wait on the network",
    )

    @model_validator(mode="before")
    @classmethod
    def _globus_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        ignored = {**GLOBUS_KEYS, **cls.globus_keys}
        kept = {}
        for key, value in data.items():
            if key in ignored and key not in cls.model_fields:
                problems.warn(f"engine.{key}", f"a Globus Compute key: {ignored[key]}")
            else:
                kept[key] = value
        return kept


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
    runs_tasks_in_agent: ClassVar[bool] = False
    """True when tasks run inside the agent's own process, so a task can kill the agent
    (the agent then keeps its crash journal; other engines lose only a worker)."""
    shared_caveat: ClassVar[str] = ""
    """What a task can reach of other users' tasks on a shared endpoint, for engines that do not
    keep each worker to one user ("" for those that do); the agent says it at start."""

    @classmethod
    def from_options(cls, options: EngineOptions) -> Engine:
        """Build the engine from validated options (the config's ``engine`` section)."""
        return cls(**options.model_dump())

    @property
    def name(self) -> str:
        return type(self).__name__

    def prepare(self) -> dict[str, str]:
        """Build what :meth:`start` would build (a Parsl provider with its launcher, the
        executor) without starting, submitting or connecting anything, and say what was built:
        ``{"engine": ..., "executor": ..., "provider": ..., "launcher": ...}`` (the keys that
        apply). ``farcall-endpoint check`` and ``start`` call it first, so a provider's missing
        package or a missing Kubernetes config is an ``EndpointConfigError`` before the
        endpoint connects."""
        return {"engine": self.name}

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

    @abc.abstractmethod
    def cancel(self, task_ids: Collection[str], reason: BaseException) -> None:
        """Stop these tasks, wherever they are: drop queued ones, stop running ones (kill the
        worker process, or abandon the thread and start another). Each still gets its one
        ``on_done`` call, a failed result carrying ``reason``; unknown ids are ignored.

        Never blocks: it answers the tasks from the calling thread (``on_done`` runs inside
        this call) and leaves stopping workers to the engine's own threads. An engine that
        cannot stop tasks raises ``NotImplementedError``.
        """

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
