"""What the broker stores, as one pydantic model each: users, functions, endpoints, task groups, tasks.

The store backends (memory, Redis) read and write these; the HTTP routes turn
them into the REST answers of :mod:`farcall.protocol.rest`. Every record names its
owner (``user_id``); only the broker sees that field.

Hot paths build records with ``model_construct`` from values the broker made
itself (no validation twice); anything read from outside goes through
``model_validate``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from farcall.broker.actions import identity_urn
from farcall.protocol.channel import Heartbeat
from farcall.protocol.common import Attempt, TaskState, Versions
from farcall.protocol.timers import TimerRun, TimerSchedule, TimerState

MISSED_BEATS = 3
"""Heartbeats an endpoint may miss before the broker calls it offline."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class UserRecord(_Record):
    user_id: str
    name: str
    """Unique on the broker; what others name the user by when they share with them."""
    created_at: float
    disabled: bool = False
    """Set by an administrator (``farcall-broker users disable``): none of the user's tokens, nor
    the credentials of the endpoints they own, is accepted until ``users enable``."""


class TokenRecord(_Record):
    """One of a user's tokens (the token itself is never stored, only its hash)."""

    token_id: str
    user_id: str
    name: str = ""
    created_at: float
    token_hash: str
    """SHA-256 of the token: what the broker looks tokens up by (never shown in answers)."""


class FunctionRecord(_Record):
    """A registered function; ``function`` is its serialized body (opaque to the broker)."""

    function_id: str
    user_id: str
    function_name: str = ""
    description: str = ""
    function: str
    created_at: float
    shared_with: list[str] = Field(default_factory=list)
    """Ids of the users (besides the owner) who may run it and read its metadata."""
    public: bool = False
    """Every user may run it and read its metadata."""

    def usable_by(self, user_id: str) -> bool:
        """Whether ``user_id`` may run this function and read it."""
        return user_id == self.user_id or self.public or user_id in self.shared_with


class EndpointRecord(_Record):
    """A registered endpoint and what the broker last heard of it."""

    endpoint_id: str
    user_id: str
    name: str
    description: str = ""
    created_at: float
    last_heartbeat: float | None = None
    last_seen: float | None = None
    """Any frame from the endpoint; heartbeats and connects count."""
    heartbeat: Heartbeat = Field(default_factory=Heartbeat)
    heartbeat_period: float | None = None
    """Seconds between the endpoint's heartbeats, as its agent said in its hello."""
    connected: bool = False
    """Whether any channel session of the endpoint is open, on any broker replica."""
    queued_tasks: int = 0
    """Tasks in its queue, not yet taken by a channel session."""
    inflight_tasks: int = 0
    """Tasks handed to a channel session whose results have not come back."""
    shared_with: list[str] = Field(default_factory=list)
    """Ids of the users (besides the owner) who may submit to it and read its status."""
    multi_user: bool = False
    """A multi-user endpoint's manager, as its agent said in its last hello: it runs no task
    itself; each user's tasks go to a user endpoint it starts as that user (``user_endpoints``)."""
    user_config_schema: dict[str, Any] | None = None
    """A manager's JSON Schema for ``user_endpoint_config`` (from its last hello), or None."""
    parent_id: str = ""
    """For a user endpoint: its manager's id (it is owned by the manager's owner)."""
    for_user: str = ""
    """For a user endpoint: the user whose tasks it runs (the one user it is shared with)."""
    user_endpoint_config: dict[str, Any] = Field(default_factory=dict)
    """For a user endpoint: the values its manager renders its configuration with."""
    config_hash: str = ""
    """For a user endpoint: the SHA-256 of ``user_endpoint_config`` as canonical JSON."""

    def usable_by(self, user_id: str) -> bool:
        """Whether ``user_id`` may submit to this endpoint and read its status."""
        return user_id == self.user_id or user_id in self.shared_with

    @property
    def isolates_users(self) -> bool:
        """Whether the endpoint runs each user's tasks apart, as that user: a multi-user
        endpoint's manager and its user endpoints do. Any other endpoint runs every task as its
        owner's Unix account, so the users it is shared with can act as the owner and see each
        other's work on it; sharing it answers with a warning that says so
        (``sharing.SINGLE_USER_WARNING``)."""
        return self.multi_user or bool(self.parent_id)

    def offline_after(self, default: float) -> float:
        """Silence after which the endpoint counts as offline: a few missed heartbeats
        (``MISSED_BEATS`` periods plus slack), or ``default`` when its period is unknown."""
        if self.heartbeat_period is None:
            return default
        return MISSED_BEATS * self.heartbeat_period + 5.0

    def online(self, default_timeout: float, at: float) -> bool:
        """Connected and heard from within ``offline_after(default_timeout)`` of ``at``."""
        return (self.connected and self.last_seen is not None
                and at - self.last_seen < self.offline_after(default_timeout))


class TaskGroupRecord(_Record):
    task_group_id: str
    user_id: str
    created_at: float


class TaskRecord(_Record):
    """One task: where it runs, its state with the time of each transition, and its outcome.

    ``data`` and ``error`` are set once the task is terminal (see ``farcall.protocol.channel.ResultMessage``).
    """

    task_id: str
    user_id: str
    task_group_id: str
    endpoint_id: str
    function_id: str
    state: TaskState
    transitions: dict[str, float] = Field(default_factory=dict)
    data: str = ""
    error: str = ""
    completed_at: float | None = None
    submitter: Versions | None = None
    worker: Versions | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    """Earlier tries cut short by a system failure (a lost session, a lost worker), oldest first."""


@dataclass(frozen=True, slots=True)
class NewTasks:
    """A submitted batch as the store records it: one user, one task group, one endpoint.

    Tasks are ``task_ids[i]`` calling ``function_ids[i]``, all ``waiting-for-endpoint``
    since ``waiting_at``. ``new_group`` creates the task group with them.
    """

    user_id: str
    task_group_id: str
    endpoint_id: str
    task_ids: list[str]
    function_ids: list[str]
    received_at: float
    waiting_at: float
    submitter: Versions | None = None
    new_group: bool = False
    request_id: str = ""
    """The submitter's name for this submission (``BatchSubmission.request_id``): the store
    keeps what it created under it, so the same request creates nothing the second time."""
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """This batch's entry among the unqueued ones (``UnqueuedStore``) while it goes to the queue."""

    def records(self) -> list[TaskRecord]:
        """The task records this batch creates, in order."""
        transitions = {TaskState.RECEIVED.value: self.received_at,
                       TaskState.WAITING.value: self.waiting_at}
        return [
            TaskRecord.model_construct(
                task_id=task_id, user_id=self.user_id, task_group_id=self.task_group_id,
                endpoint_id=self.endpoint_id, function_id=function_id, state=TaskState.WAITING,
                transitions=dict(transitions), data="", error="", completed_at=None,
                submitter=self.submitter, worker=None, attempts=[],
            )
            for task_id, function_id in zip(self.task_ids, self.function_ids, strict=True)
        ]


class ActionRecord(_Record):
    """An action of the Action Provider API (``farcall.broker.actions``): who started it and who else
    may see or manage it, its tasks, and once it ended its final status, kept until it is
    released (the task records may expire before that).

    ``task_ids`` is empty while the tasks are being submitted (``task_count`` of them), one
    batch per endpoint, each under its own request id (``action_runner``), so a broker that
    stopped midway leaves tasks that can be found, and a batch it never sent can be given up.
    """

    action_id: str
    user_id: str
    """Its creator, whose tasks it runs."""
    request_id: str
    request_digest: str
    """``ActionRequest.digest()``: the same request id with another request is refused."""
    label: str | None = None
    monitor_by: list[str] = Field(default_factory=list)
    manage_by: list[str] = Field(default_factory=list)
    created_at: float
    release_after: float
    """Seconds its final status is kept once it ended."""
    task_count: int
    batches: int = 0
    """Batches its tasks are submitted in (0: an action from before batches had request ids)."""
    call_batch: list[int] = Field(default_factory=list)
    """The batch of each call, in the calls' order (empty when there is one batch)."""
    task_group_id: str = ""
    task_ids: list[str] = Field(default_factory=list)
    """In the calls' order; ``""`` for a call whose batch was never submitted."""
    status: Literal["ACTIVE", "SUCCEEDED", "FAILED"] = "ACTIVE"
    completed_at: float | None = None
    display_status: str | None = None
    details: dict[str, Any] | None = None
    """The final details, once it ended."""

    def may_monitor(self, user_id: str) -> bool:
        """Whether ``user_id`` may see it: its creator, and whom ``monitor_by`` or ``manage_by``
        name."""
        urn = identity_urn(user_id)
        return user_id == self.user_id or urn in self.monitor_by or urn in self.manage_by

    def may_manage(self, user_id: str) -> bool:
        """Whether ``user_id`` may cancel and release it: its creator, and whom ``manage_by``
        names."""
        return user_id == self.user_id or identity_urn(user_id) in self.manage_by


class TimerRecord(_Record):
    """A timer: what it submits at each run (a task of ``user_id``'s, as ``POST /v1/tasks``
    would), its schedule, and its runs so far (the latest ``TIMER_RUNS_KEPT``, oldest first;
    empty in lists).

    ``next_run`` is set while it is ``active`` (it is the time the broker fires it at, and what
    ``TimerStore.claim`` compares), None otherwise.
    """

    timer_id: str
    user_id: str
    name: str = ""
    endpoint_id: str
    function_id: str
    args: str
    submitter: Versions | None = None
    schedule: TimerSchedule
    state: TimerState = "active"
    reason: str | None = None
    next_run: float | None = None
    run_count: int = 0
    runs: list[TimerRun] = Field(default_factory=list)
    created_at: float
