"""The in-process state every part of one ``MemoryStore`` shares, and the changes to it more
than one part makes (a task ending, a group submitted to, a user shared with).

All methods run on one event loop, so each part's method is atomic without locks."""

from __future__ import annotations

from dataclasses import dataclass, field

from farcall.broker.records import (
    EndpointRecord,
    FunctionRecord,
    TaskGroupRecord,
    TaskRecord,
    TokenRecord,
    UserRecord,
)
from farcall.broker.store.base import (
    MAX_USER_GROUPS,
    LocalSubscription,
    Principal,
    Submitted,
    UnqueuedBatch,
)
from farcall.protocol.common import TaskState
from farcall.protocol.stream import TaskResult


@dataclass
class State:
    """Everything the in-process parts hold; one per ``MemoryStore``, as one Redis database
    backs the Redis parts."""

    users: dict[str, UserRecord] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    """user name -> user id"""
    tokens: dict[str, Principal] = field(default_factory=dict)
    """token hash -> whose it is (users' and endpoints')"""
    user_tokens: dict[str, TokenRecord] = field(default_factory=dict)
    """token id -> the user token's record"""
    functions: dict[str, FunctionRecord] = field(default_factory=dict)
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)
    """endpoint id -> its credential's hash"""
    sessions: dict[str, set[str]] = field(default_factory=dict)
    live: dict[str, str] = field(default_factory=dict)
    """endpoint id -> its live session id"""
    crashes: dict[str, int] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)
    """manager endpoint id -> its user endpoints' ids"""
    starting: dict[str, float] = field(default_factory=dict)
    """user endpoint id -> when its start claim ends (``time.monotonic``)"""
    queued: dict[str, int] = field(default_factory=dict)
    inflight: dict[str, dict[str, str]] = field(default_factory=dict)
    groups: dict[str, TaskGroupRecord] = field(default_factory=dict)
    group_tasks: dict[str, list[str]] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    open_tasks: dict[str, int] = field(default_factory=dict)
    """user id -> tasks not terminal yet"""
    open_ids: dict[str, set[str]] = field(default_factory=dict)
    """user id -> ids of their tasks not terminal yet"""
    user_groups: dict[str, dict[str, float]] = field(default_factory=dict)
    """user id -> task group id -> when last submitted to (the index of recent groups)"""
    subscribers: dict[str, set[LocalSubscription]] = field(default_factory=dict)
    requests: dict[tuple[str, str], Submitted] = field(default_factory=dict)
    """(user id, request id) -> what that submission created"""
    unqueued: dict[str, tuple[float, UnqueuedBatch]] = field(default_factory=dict)
    """batch id -> (recorded or last claimed at, the batch)"""

    def closed(self, task: TaskRecord) -> None:
        """``task`` just became terminal: it leaves its user's count of open tasks."""
        self.open_tasks[task.user_id] = max(0, self.open_tasks.get(task.user_id, 0) - 1)
        self.open_ids.get(task.user_id, set()).discard(task.task_id)

    def end(self, task: TaskRecord, state: TaskState, error: str, at: float) -> TaskResult:
        """End ``task`` here (failed or cancelled by the broker); what its submitter sees of it."""
        task.state, task.error, task.completed_at = state, error, at
        task.transitions[state.value] = at
        self.closed(task)
        return TaskResult.ended_by_broker(task.task_id, state, error, at)

    def group_active(self, user_id: str, task_group_id: str, at: float) -> None:
        """Mark the group submitted to at ``at`` in the user's index, which keeps the latest
        ``MAX_USER_GROUPS``."""
        index = self.user_groups.setdefault(user_id, {})
        index[task_group_id] = max(at, index.get(task_group_id, at))
        while len(index) > MAX_USER_GROUPS:
            del index[min(index, key=index.__getitem__)]

    def live_task(self, task_id: str, endpoint_id: str) -> TaskRecord | None:
        """The task if it exists, runs on ``endpoint_id`` and is not terminal yet."""
        task = self.tasks.get(task_id)
        if task is None or task.endpoint_id != endpoint_id or task.state.terminal:
            return None
        return task


def shared_with(user_ids: list[str], user_id: str, shared: bool) -> list[str]:
    """``user_ids`` with ``user_id`` added (``shared``) or removed, sorted as Redis hands them out."""
    return sorted(set(user_ids) | {user_id} if shared else set(user_ids) - {user_id})
