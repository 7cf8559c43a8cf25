"""The store interface: users, functions, endpoints, task groups, tasks, results.

The HTTP routes and the endpoint channel only see this interface, so they do
not know whether Redis or process memory sits behind it. Records are plain
dicts shaped like the REST answers of docs/protocol.md plus a ``user_id`` owner.
Every method that touches many tasks takes them as one batch, so an
implementation can serve it in one round trip.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from farcall.messages import ResultMessage, TaskResult, TaskState

Record = dict[str, Any]
TERMINAL = frozenset({TaskState.SUCCESS.value, TaskState.FAILED.value})
_LIFECYCLE = {s.value: i for i, s in enumerate(TaskState)}


def ordered_transitions(transitions: dict[str, float]) -> dict[str, float]:
    """Transitions in lifecycle order (received .. terminal), whatever the clocks say."""
    return dict(sorted(transitions.items(), key=lambda kv: _LIFECYCLE.get(kv[0], len(_LIFECYCLE))))


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: a user or an endpoint, by id."""

    kind: Literal["user", "endpoint"]
    id: str
    token_hash: str


class Subscription(abc.ABC):
    """Result-stream frames (JSON text) published for one task group, from any broker replica."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class LocalSubscription(Subscription):
    """Frames handed over in this process (``put``); the iteration ends at ``put(None)``."""

    def __init__(self, fanout: dict[str, set[LocalSubscription]], group: str) -> None:
        self._fanout, self._group = fanout, group
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        fanout.setdefault(group, set()).add(self)

    def put(self, frame: str | None) -> None:
        self._queue.put_nowait(frame)

    async def __aiter__(self) -> AsyncIterator[str]:
        while (frame := await self._queue.get()) is not None:
            yield frame

    async def close(self) -> None:
        subs = self._fanout.get(self._group)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self._fanout[self._group]
        self._queue.put_nowait(None)


def deliver_locally(fanout: dict[str, set[LocalSubscription]], group: str, frame: str) -> None:
    for sub in list(fanout.get(group, ())):
        sub.put(frame)


class Store(abc.ABC):
    """Durable broker state. Completion is idempotent: the first result for a task id wins."""

    async def start(self) -> None:
        """Connect (and fail fast if the backing service does not answer)."""
        return None

    async def close(self) -> None:
        """Release connections."""
        return None

    # ------------------------------------------------------------ users and tokens
    @abc.abstractmethod
    async def create_user(self, user: Record, token_hash: str) -> None: ...

    @abc.abstractmethod
    async def resolve_token(self, token_hash: str) -> Principal | None: ...

    # ------------------------------------------------------------ functions
    @abc.abstractmethod
    async def put_function(self, function: Record) -> None:
        """Store a function record.

        Keys: function_id, user_id, function_name, description, function, created_at.
        """

    @abc.abstractmethod
    async def get_functions(self, function_ids: list[str]) -> dict[str, Record]:
        """The functions that exist among ``function_ids``, by id."""

    @abc.abstractmethod
    async def delete_function(self, function_id: str) -> None: ...

    # ------------------------------------------------------------ endpoints
    @abc.abstractmethod
    async def put_endpoint(self, endpoint: Record, credential_hash: str) -> None:
        """Store ``endpoint_id, user_id, name, description, created_at`` and its credential."""

    @abc.abstractmethod
    async def get_endpoint(self, endpoint_id: str) -> Record | None:
        """The record plus ``last_heartbeat``, ``last_seen``, ``heartbeat``, ``connected`` and
        ``queued_tasks`` (tasks in its queue, not yet taken by a channel session)."""

    @abc.abstractmethod
    async def list_endpoints(self, user_id: str) -> list[Record]: ...

    @abc.abstractmethod
    async def delete_endpoint(self, endpoint_id: str) -> None:
        """Remove the endpoint, revoke its credential, forget its in-flight set."""

    @abc.abstractmethod
    async def set_connected(
        self, endpoint_id: str, session_id: str, connected: bool, at: float
    ) -> None:
        """Add or remove one channel session; an endpoint is connected while it has any."""

    @abc.abstractmethod
    async def set_heartbeat(self, endpoint_id: str, heartbeat: Record, at: float) -> None: ...

    @abc.abstractmethod
    async def touch_endpoint(self, endpoint_id: str, at: float) -> None:
        """Record that the endpoint was heard from (any frame) at ``at``."""

    # ------------------------------------------------------------ task groups
    @abc.abstractmethod
    async def create_task_group(self, task_group_id: str, user_id: str, at: float) -> None: ...

    @abc.abstractmethod
    async def get_task_group_owner(self, task_group_id: str) -> str | None: ...

    @abc.abstractmethod
    async def get_task_group_tasks(self, task_group_id: str) -> list[str]: ...

    # ------------------------------------------------------------ tasks
    @abc.abstractmethod
    async def submit_context(
        self, endpoint_id: str, function_ids: list[str], task_group_id: str | None
    ) -> tuple[str | None, dict[str, Record], str | None]:
        """What a submission needs, in one round trip: the endpoint's owner, the functions
        that exist among ``function_ids`` (by id), and the task group's owner."""

    @abc.abstractmethod
    async def create_tasks(
        self,
        tasks: list[Record],
        new_group: Record | None = None,
        inflight: dict[str, str] | None = None,
    ) -> None:
        """Create task records (and ``new_group``: task_group_id, user_id, created_at) at once.

        Each task: ``task_id, user_id, task_group_id, endpoint_id, function_id, state,
        transitions, submitter``. All tasks of one call belong to one group and one endpoint.
        ``inflight`` (id -> TaskMessage JSON) goes into the endpoint's in-flight set at once,
        for tasks sent to it directly; the others add to its queued-task count.
        """

    @abc.abstractmethod
    async def count_queued(self, endpoint_id: str, delta: int) -> None:
        """Adjust the endpoint's queued-task count (tasks queued again, or never queued)."""

    @abc.abstractmethod
    async def get_tasks(self, task_ids: list[str]) -> list[Record | None]:
        """Task records in the order asked; None for unknown (or expired) ids."""

    @abc.abstractmethod
    async def fail_tasks(self, task_ids: list[str], error: str, at: float) -> None:
        """Mark tasks failed that could not be queued (they never reach an endpoint)."""

    # ------------------------------------------------------------ endpoint channel
    @abc.abstractmethod
    async def dispatch(self, endpoint_id: str, tasks: dict[str, str], taken: int) -> list[str]:
        """Put tasks (id -> TaskMessage JSON) in the endpoint's in-flight set.

        ``taken`` tasks left the queue (the queued-task count shrinks by it). Returns
        the ids accepted: tasks that exist, belong to this endpoint and are not
        terminal. The others must be dropped by the caller.
        """

    @abc.abstractmethod
    async def get_inflight(self, endpoint_id: str) -> dict[str, str]: ...

    @abc.abstractmethod
    async def remove_inflight(self, endpoint_id: str, task_ids: list[str]) -> None: ...

    @abc.abstractmethod
    async def mark_running(self, endpoint_id: str, started: dict[str, float]) -> None:
        """Set ``running`` for tasks of this endpoint that are not terminal yet."""

    @abc.abstractmethod
    async def complete(
        self, endpoint_id: str, results: list[ResultMessage], at: float
    ) -> list[tuple[str, TaskResult]]:
        """Store results, first one per task id wins; drop them from the in-flight set.

        Returns ``(task_group_id, TaskResult)`` for the newly completed tasks only.
        Results for tasks of other endpoints are ignored.
        """

    # ------------------------------------------------------------ result fan-out
    @abc.abstractmethod
    async def publish_results(self, task_group_id: str, frame: str) -> None: ...

    @abc.abstractmethod
    async def subscribe_results(self, task_group_id: str) -> Subscription:
        """Start receiving frames for a group; frames published after this returns are delivered."""
