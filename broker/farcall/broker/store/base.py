"""The store: a few narrow interfaces composed into one ``Store``, each with a memory and a Redis backend.

The HTTP routes and the endpoint channel only see these interfaces, so they do
not know whether Redis or process memory sits behind them. Records are the
typed models of :mod:`farcall.broker.records`. Every method that touches many tasks
takes them as one batch, so a backend can serve it in one round trip; where one
operation spans two interfaces' data (a submitted batch sent straight to its
endpoint is also in flight), it belongs to the interface that owns the main
concept and says so.

| part | holds |
|---|---|
| ``users`` | users (unique names) and the tokens that identify users and endpoints |
| ``functions`` | registered functions and whom they are shared with |
| ``endpoints`` | endpoints, whom they are shared with, their sessions, heartbeats and queued-task counts |
| ``tasks`` | task groups (and each user's recent ones), task records, their life cycle; open-task counts |
| ``inflight`` | per endpoint: tasks handed to a channel session and not finished |
| ``unqueued`` | batches recorded as waiting whose queue message is not confirmed yet |
| ``pubsub`` | frames to every replica: task groups' results, endpoints' control messages, token revocations |
| ``actions`` | actions of the Action Provider API, each one record that expires |
| ``timers`` | timers, the times they run next, and their runs |

Data-plane blobs have a store of their own, ``BlobStore`` (:mod:`.memory.blobs`,
:mod:`.redis.blobs`, :mod:`.files`), chosen apart from the records' backend.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from farcall.broker.records import (
    ActionRecord,
    EndpointRecord,
    FunctionRecord,
    NewTasks,
    TaskGroupRecord,
    TaskRecord,
    TimerRecord,
    TokenRecord,
    UserRecord,
)
from farcall.protocol.channel import Heartbeat, ResultMessage
from farcall.protocol.common import TaskState
from farcall.protocol.control import AccessRevoked, ControlMessage, TokenRevocation
from farcall.protocol.stream import ResultStreamFrame, TaskResult
from farcall.protocol.timers import TimerRun

_LIFECYCLE = {s.value: i for i, s in enumerate(TaskState)}

LOST_ATTEMPT = ("the endpoint's session ended with the task in flight and its agent no longer "
                "held it; the task was queued again")
CRASH_ATTEMPT = "the endpoint's agent process died while the task was running; it was queued again"
CANCELLED_ERROR = "the task was cancelled at its submitter's request"


def owner_cancelled(endpoint_id: str) -> str:
    """The error of a task its endpoint's owner cancelled (not its submitter)."""
    return f"the task was cancelled by the owner of endpoint {endpoint_id}, where it was to run"


def crash_failure(crashes: int) -> str:
    """The error of a task failed for having been running at ``crashes`` deaths of its agent."""
    return (f"the endpoint's agent process died {crashes} times while this task was running, so "
            "the task is probably what kills it (os._exit, a crash in native code, or memory "
            "exhausted in the agent). It is not sent again: fix the function, or run it on an "
            "endpoint with a ProcessPoolEngine or Parsl engine, where a crash costs only a worker.")


def ordered_transitions(transitions: dict[str, float]) -> dict[str, float]:
    """Transitions in lifecycle order (received .. terminal), whatever the clocks say."""
    return dict(sorted(transitions.items(), key=lambda kv: _LIFECYCLE.get(kv[0], len(_LIFECYCLE))))


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: a user or an endpoint, by id."""

    kind: Literal["user", "endpoint"]
    id: str
    token_hash: str
    token_id: str = ""
    """A user token's id (what revoking it names); empty for endpoint credentials."""


class OverQuota(Exception):  # noqa: N818 - a condition the caller answers with 429, not a bug
    """``TaskStore.create`` refused a batch: the user's open tasks would pass their quota."""

    def __init__(self, open_tasks: int, limit: int) -> None:
        super().__init__(f"{open_tasks} open tasks, limit {limit}")
        self.open_tasks, self.limit = open_tasks, limit


@dataclass(frozen=True)
class Submitted:
    """What a submission's request id stands for (``NewTasks.request_id``): the tasks it created,
    or none when the request was abandoned (``TaskStore.submitted``)."""

    endpoint_id: str
    task_group_id: str
    task_ids: list[str]

    @property
    def abandoned(self) -> bool:
        return not self.task_ids


ABANDONED = Submitted("", "", [])


class AlreadySubmitted(Exception):  # noqa: N818 - a condition the caller answers, not a bug
    """``TaskStore.create`` refused a batch whose request id its user used before; ``prior`` is
    what that request created (nothing, if it was abandoned)."""

    def __init__(self, prior: Submitted) -> None:
        super().__init__(f"request already submitted: {prior}")
        self.prior = prior


@dataclass(frozen=True)
class UnqueuedBatch:
    """A batch recorded as waiting whose queue message was never confirmed."""

    batch_id: str
    endpoint_id: str
    body: bytes
    """The queue message (``join_task_batch``)."""


@dataclass(frozen=True)
class Cancelled:
    """What ``TaskStore.cancel`` did."""

    results: list[tuple[str, str, TaskResult]]
    """``(task group id, endpoint id, TaskResult)`` of each task it cancelled."""
    unchanged: dict[str, str]
    """Task id -> why not: its final state, ``running`` (only queued asked), or ``not_found``."""


@dataclass(frozen=True)
class Reconciled:
    """What ``InflightStore.reconcile`` found among the tasks a new session's agent no longer holds."""

    again: dict[str, str]
    """Task id -> TaskMessage JSON of tasks to queue again (still in the in-flight set: the caller
    removes them once they are queued)."""
    failed: list[tuple[str, TaskResult]]
    """``(task group id, TaskResult)`` of tasks failed for having crashed the agent too often."""
    dropped: int
    """Finished or unknown tasks removed from the in-flight set."""


@dataclass(frozen=True)
class GroupActivity:
    """A task group as the user's index of recent groups gives it."""

    task_group_id: str
    created_at: float
    last_active: float
    """When a batch was last submitted to it (``created_at`` before the first)."""
    task_count: int


MAX_USER_GROUPS = 1000
"""Task groups each user's index of recent groups keeps (``TaskStore.recent_groups``)."""


@dataclass(frozen=True)
class SubmissionContext:
    """What accepting a batch needs to know, read in one round trip."""

    endpoint_owner: str | None
    endpoint_shared_with: frozenset[str]
    """User ids the endpoint is shared with (besides its owner)."""
    functions: dict[str, FunctionRecord]
    """The functions that exist among those asked for, by id (with whom they are shared)."""
    group_owner: str | None
    endpoint_multi_user: bool = False
    """The endpoint is a multi-user endpoint's manager: tasks go to user endpoints."""
    endpoint_parent: str = ""
    """The endpoint is a user endpoint of this manager (tasks reach it only through it)."""

    def endpoint_usable_by(self, user_id: str) -> bool:
        return user_id == self.endpoint_owner or user_id in self.endpoint_shared_with


class UserStore(abc.ABC):
    """Users, and the tokens of users and endpoints (an endpoint's is stored by ``EndpointStore``)."""

    @abc.abstractmethod
    async def create(self, user: UserRecord, token: TokenRecord) -> bool:
        """Create the user with its first token; False (changing nothing) if the name is taken."""

    @abc.abstractmethod
    async def get(self, user_id: str) -> UserRecord | None: ...

    @abc.abstractmethod
    async def get_many(self, user_ids: list[str]) -> dict[str, UserRecord]:
        """The users that exist among ``user_ids``, by id."""

    @abc.abstractmethod
    async def by_name(self, name: str) -> UserRecord | None: ...

    @abc.abstractmethod
    async def all(self) -> list[UserRecord]:
        """Every user, by name (for an administrator's listing)."""

    @abc.abstractmethod
    async def add_token(self, token: TokenRecord, max_tokens: int = 0) -> bool:
        """Give the user (``token.user_id``, who exists) another token; False, changing nothing,
        when they hold ``max_tokens`` already (0: no limit)."""

    @abc.abstractmethod
    async def token_count(self, user_id: str) -> int:
        """How many tokens the user holds (revoked ones are gone; a disabled user's still count)."""

    @abc.abstractmethod
    async def set_disabled(self, user_id: str, disabled: bool) -> bool:
        """Disable the user (or enable them again); whether they exist. While disabled,
        ``resolve_token`` knows neither their tokens nor the credentials of the endpoints they
        own; both are kept, and work again once enabled."""

    @abc.abstractmethod
    async def list_tokens(self, user_id: str | None = None) -> list[TokenRecord]:
        """The user's tokens (every user's with None), oldest first."""

    @abc.abstractmethod
    async def revoke_token(self, token_id: str, user_id: str | None = None) -> TokenRecord | None:
        """Delete the token (only if it is ``user_id``'s, when given); the deleted record, or
        None if there was no such token. From here on ``resolve_token`` does not know it."""

    @abc.abstractmethod
    async def resolve_token(self, token_hash: str) -> Principal | None:
        """The user or endpoint a token hash belongs to (with the user token's id); None for
        a token of a disabled user, or the credential of an endpoint a disabled user owns."""


class FunctionStore(abc.ABC):
    @abc.abstractmethod
    async def put(self, function: FunctionRecord) -> None:
        """Store a new function (it counts towards its owner's ``count``)."""

    @abc.abstractmethod
    async def get_many(self, function_ids: list[str]) -> dict[str, FunctionRecord]:
        """The functions that exist among ``function_ids``, by id, with ``shared_with`` and
        ``public`` filled in."""

    @abc.abstractmethod
    async def delete(self, function_id: str) -> None: ...

    @abc.abstractmethod
    async def count(self, user_id: str) -> int:
        """How many functions the user has registered (and not deleted)."""

    @abc.abstractmethod
    async def share(
        self, function_id: str, user_id: str | None, public: bool | None, shared: bool
    ) -> None:
        """Share (``shared``) or unshare the function: with ``user_id`` if given, and, if
        ``public`` is True, with everyone (public False changes nothing about that)."""


class EndpointStore(abc.ABC):
    @abc.abstractmethod
    async def put(self, endpoint: EndpointRecord, credential_hash: str) -> None:
        """Store a new endpoint and its credential (a token of kind ``endpoint``)."""

    @abc.abstractmethod
    async def get(self, endpoint_id: str) -> EndpointRecord | None: ...

    @abc.abstractmethod
    async def list(self, user_id: str) -> list[EndpointRecord]:
        """The user's endpoints and the endpoints shared with the user, by id."""

    @abc.abstractmethod
    async def credential_hash(self, endpoint_id: str) -> str | None:
        """The hash of the endpoint's current credential (None for an unknown endpoint): what
        its workers' grants are derived from, so replacing the credential voids them."""

    @abc.abstractmethod
    async def delete(self, endpoint_id: str) -> None:
        """Remove the endpoint, revoke its credential, forget its in-flight set, queued count
        and shares (it leaves the lists of the users it was shared with)."""

    @abc.abstractmethod
    async def share(self, endpoint_id: str, user_id: str, shared: bool) -> None:
        """Share the endpoint with ``user_id`` (``shared``) or stop sharing it."""

    @abc.abstractmethod
    async def rotate_credential(self, endpoint_id: str, credential_hash: str) -> str | None:
        """Give the endpoint a new credential (its hash): the old one stops resolving at once.
        The old credential's hash, or None (changing nothing) if there is no such endpoint."""

    @abc.abstractmethod
    async def connect_session(
        self, endpoint_id: str, session_id: str, heartbeat_period: float | None, at: float
    ) -> str | None:
        """Make ``session_id`` the endpoint's one live session; the previous live one, if any.

        From here on only this session may take tasks in flight (``InflightStore.add``,
        ``TaskStore.create`` with in-flight tasks), on any replica.
        """

    @abc.abstractmethod
    async def disconnect_session(self, endpoint_id: str, session_id: str, at: float) -> None:
        """The session ended; it stops being the live one if it still was."""

    @abc.abstractmethod
    async def live_session(self, endpoint_id: str) -> str | None:
        """The endpoint's live session id, if one is connected."""

    @abc.abstractmethod
    async def set_heartbeat(self, endpoint_id: str, heartbeat: Heartbeat, at: float) -> None: ...

    @abc.abstractmethod
    async def touch(self, endpoint_id: str, at: float) -> None:
        """Record that the endpoint was heard from (any frame) at ``at``."""

    @abc.abstractmethod
    async def count_queued(self, endpoint_id: str, delta: int) -> None:
        """Adjust the endpoint's queued-task count (tasks queued again, or never queued)."""

    # ---- multi-user endpoints: a manager and its user endpoints (``farcall.broker.user_endpoints``)

    @abc.abstractmethod
    async def set_multi_user(
        self, endpoint_id: str, multi_user: bool, schema: dict[str, Any] | None
    ) -> bool:
        """Record what the endpoint's agent said of itself in its hello: whether it is a
        multi-user endpoint's manager, and its ``user_config_schema``. Whether ``multi_user``
        changed (False, changing nothing, for an unknown endpoint)."""

    @abc.abstractmethod
    async def ensure_user_endpoint(self, child: EndpointRecord, credential_hash: str) -> bool:
        """Create the user endpoint ``child`` (its ``parent_id``, ``for_user``, configuration;
        shared with ``for_user`` unless that is its owner) with its credential, and list it among
        its manager's ``children``, unless it exists. Idempotent, and atomic however many
        replicas race. Whether the user endpoint exists now: False (creating nothing) when its
        manager is gone."""

    @abc.abstractmethod
    async def children(self, endpoint_id: str) -> builtins.list[EndpointRecord]:
        """A manager's user endpoints, by id (with sessions, queued and in-flight counts)."""

    @abc.abstractmethod
    async def claim_start(self, endpoint_id: str, seconds: float) -> bool:
        """Claim asking for a start of the user endpoint: True unless it has a live session or
        a claim holds (then nothing changes). A claim holds for ``seconds``, until the endpoint
        connects (``connect_session``), or until ``release_start``: so however many
        submissions and replicas ask, its manager hears once per ``seconds``."""

    @abc.abstractmethod
    async def release_start(self, endpoint_id: str) -> None:
        """End the endpoint's start claim, if it has one."""


class TaskStore(abc.ABC):
    """Task groups and tasks. Completion is idempotent: the first result for a task id wins."""

    @abc.abstractmethod
    async def create_group(self, group: TaskGroupRecord) -> None: ...

    @abc.abstractmethod
    async def group_owner(self, task_group_id: str) -> str | None: ...

    @abc.abstractmethod
    async def group_tasks(self, task_group_id: str, last: int | None = None) -> list[str]:
        """The group's task ids in submission order (with ``last``, only the last so many)."""

    @abc.abstractmethod
    async def recent_groups(self, user_id: str, limit: int, offset: int = 0) -> list[GroupActivity]:
        """The user's task groups, the most recently submitted to first, from ``offset``.

        Every batch (and ``create_group``) keeps a per-user index up to date; it holds the
        latest ``MAX_USER_GROUPS`` groups and drops those idle for longer than the results'
        lifetime (their records expired). An older group is still readable by its id.
        """

    @abc.abstractmethod
    async def summaries(self, task_ids: list[str]) -> list[TaskRecord | None]:
        """As ``get_many``, for listings: only ids, ``state``, the ``received`` transition and
        ``completed_at`` are read; ``data``, ``error``, versions and attempts stay empty."""

    @abc.abstractmethod
    async def submission_context(
        self, endpoint_id: str, function_ids: list[str], task_group_id: str | None
    ) -> SubmissionContext:
        """The endpoint's owner (whom it is shared with, whether it is a manager or a user
        endpoint), the functions, and the task group's owner, in one round trip."""

    @abc.abstractmethod
    async def create(
        self, batch: NewTasks, inflight: dict[str, str] | None = None, session_id: str = "",
        max_open: int = 0, queued_body: bytes = b"",
    ) -> bool:
        """Record a submitted batch (and its new task group) at once.

        With a ``request_id``, a user's request that created tasks before (or was abandoned)
        raises ``AlreadySubmitted`` naming them, changing nothing; otherwise the batch is kept
        under it (``submitted``) as long as results are.

        A batch that counts as queued is also kept among the unqueued ones
        (``UnqueuedStore``, under ``batch_id``, its message ``queued_body`` or, when it
        was meant to go in flight, the ``inflight`` bodies joined) until the caller has queued
        it and says ``unqueued.done``: a broker that dies in between leaves it for another
        replica's sweep to queue, so no waiting task is stranded.

        The tasks add to the user's count of open tasks (``open_tasks``); with ``max_open``
        (0: no limit), a batch that would take it past ``max_open`` raises ``OverQuota``
        and changes nothing. Every way a task becomes terminal (result, failure, cancel)
        takes it off that count.

        Spans two other parts: ``inflight`` (task id -> TaskMessage JSON, for tasks to send
        straight to the endpoint's session ``session_id``) goes into the endpoint's in-flight
        set, but only while that session is the live one; otherwise, and for tasks without
        ``inflight``, the tasks add to its queued-task count. True when they went in flight
        (the caller sends them), False when they count as queued (the caller queues them).
        """

    @abc.abstractmethod
    async def submitted(self, user_id: str, request_id: str, abandon: bool = False
                        ) -> Submitted | None:
        """What the user's request ``request_id`` created (``ABANDONED`` if it was abandoned),
        or None if it created nothing yet. With ``abandon``, a request that created nothing is
        abandoned for good: a later ``create`` under it raises ``AlreadySubmitted(ABANDONED)``
        (so a broker that stalled mid-request cannot create tasks after the caller gave up)."""

    @abc.abstractmethod
    async def get_many(self, task_ids: list[str]) -> list[TaskRecord | None]:
        """Task records in the order asked; None for unknown (or expired) ids."""

    @abc.abstractmethod
    async def open_tasks(self, user_id: str) -> int:
        """The user's tasks that are not terminal yet (waiting or running)."""

    @abc.abstractmethod
    async def fail(self, task_ids: list[str], error: str, at: float) -> list[tuple[str, TaskResult]]:
        """Fail tasks that are not terminal yet (ones that could not be queued, for example).

        Returns ``(task group id, TaskResult)`` for the tasks this call failed.
        """

    @abc.abstractmethod
    async def open_task_ids(self, user_id: str) -> list[str]:
        """The ids of the user's tasks that are not terminal yet (an index kept where tasks are
        created and end, so finding them costs no scan)."""

    @abc.abstractmethod
    async def cancel(
        self, user_id: str | None, task_ids: list[str], only_queued: bool, at: float,
        error: str = CANCELLED_ERROR,
    ) -> Cancelled:
        """Cancel tasks among ``task_ids`` that are not terminal (with ``only_queued``: not
        running either): those ``user_id`` submitted, or that wait or run on an endpoint
        ``user_id`` owns; with ``user_id`` None, any (the broker's own cancels). A task
        ``user_id`` did not submit is cancelled saying so (``owner_cancelled``), else saying
        ``error``. A cancelled task is final: a later result for it is ignored."""

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


class InflightStore(abc.ABC):
    """Per endpoint, the tasks a channel session took (task id -> TaskMessage JSON) and no result
    has come back for; the endpoint's next hello queues again those it no longer holds."""

    @abc.abstractmethod
    async def add(
        self, endpoint_id: str, session_id: str, tasks: dict[str, str], taken: int
    ) -> list[str] | None:
        """Put tasks in the endpoint's in-flight set; ``taken`` of them left its queue.

        The queued-task count shrinks by ``taken``. Returns the ids accepted: tasks that
        exist, belong to this endpoint and are not terminal. The caller drops the others.
        Returns None, changing nothing, when ``session_id`` is not the endpoint's live
        session any more (it was replaced): the caller gives its deliveries back.
        """

    @abc.abstractmethod
    async def reconcile(
        self, endpoint_id: str, held: set[str], crashed: set[str], max_losses: int, at: float
    ) -> Reconciled:
        """Sort the in-flight tasks a new session's agent does not hold (``held``).

        Finished ones are dropped. Each other one gets an ``Attempt`` in its record and
        is to be queued again, except that a task in ``crashed`` (its agent process died
        while running it) counts one crash more, and at ``max_losses`` crashes it fails
        instead, with an error that says so.
        """

    @abc.abstractmethod
    async def get(self, endpoint_id: str) -> dict[str, str]: ...

    @abc.abstractmethod
    async def task(self, endpoint_id: str, task_id: str) -> str | None:
        """The TaskMessage JSON of one task in the endpoint's in-flight set, or None."""

    @abc.abstractmethod
    async def remove(self, endpoint_id: str, task_ids: list[str]) -> None: ...


class UnqueuedStore(abc.ABC):
    """Batches ``TaskStore.create`` recorded as waiting whose queue message is not confirmed yet.

    The submitter removes its batch (``done``) once the queue confirmed it; a batch left behind
    (its broker died in between, or the queue was down) is ``claim``-ed by a replica's sweep
    (``farcall.broker.requeue``) and queued then.
    """

    @abc.abstractmethod
    async def done(self, batch_ids: list[str]) -> None:
        """The batches are queued (or failed): forget them."""

    @abc.abstractmethod
    async def claim(self, recorded_before: float, at: float, limit: int) -> list[UnqueuedBatch]:
        """Up to ``limit`` batches recorded (or last claimed) before ``recorded_before``, oldest
        first; each now counts as claimed at ``at``, so replicas sweeping at the same time take
        different ones and a batch whose queueing failed again is tried after the same wait."""


class Subscription(abc.ABC):
    """Frames (JSON text) published on one channel, from any broker replica, in order."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


def results_channel(task_group_id: str) -> str:
    return f"results:{task_group_id}"


def control_channel(endpoint_id: str) -> str:
    return f"endpoint:{endpoint_id}"


REVOCATIONS_CHANNEL = "tokens:revoked"
"""Token revocations, and access taken away (``protocol.control.AccessRevoked``)."""


class PubSub(abc.ABC):
    """Frames to subscribers on every broker replica. Three kinds of channel, each with its own
    methods: a task group's results (``ResultStreamFrame`` JSON, forwarded to the group's result
    streams as it is), an endpoint's control messages (:mod:`farcall.protocol.control`, for the
    replica holding its session), and revocations (for every replica's caches: a revoked token,
    access to an endpoint or function taken away).

    Backends only move text on named channels (``publish``/``subscribe``); frames published
    while a subscriber's connection is down are lost, so readers catch up another way.
    """

    @abc.abstractmethod
    async def publish(self, channel: str, frame: str) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> Subscription:
        """Start receiving a channel's frames; those published after this returns are delivered."""

    async def publish_results(self, task_group_id: str, frame: ResultStreamFrame) -> None:
        await self.publish(results_channel(task_group_id), frame.model_dump_json())

    async def subscribe_results(self, task_group_id: str) -> Subscription:
        """The group's ``ResultStreamFrame`` s, as JSON text."""
        return await self.subscribe(results_channel(task_group_id))

    async def publish_control(self, endpoint_id: str, message: ControlMessage) -> None:
        await self.publish(control_channel(endpoint_id), message.model_dump_json())

    async def subscribe_control(self, endpoint_id: str) -> Subscription:
        """The endpoint's control messages, as JSON text (``protocol.control.parse_control``)."""
        return await self.subscribe(control_channel(endpoint_id))

    async def publish_revocation(self, revocation: TokenRevocation | AccessRevoked) -> None:
        await self.publish(REVOCATIONS_CHANNEL, revocation.model_dump_json())

    async def subscribe_revocations(self) -> Subscription:
        """Every ``TokenRevocation`` and ``AccessRevoked``, as JSON text
        (``protocol.control.parse_revocation``)."""
        return await self.subscribe(REVOCATIONS_CHANNEL)

    async def close(self) -> None:
        """Release what subscriptions hold (at shutdown)."""
        return None


class ActionStore(abc.ABC):
    """Actions of the Action Provider API, one record each, unique per creator and request id.

    A record expires ``ttl`` seconds after it was last written (the action's lifetime while it
    runs, ``release_after`` once it ended); its request id goes with it.
    """

    @abc.abstractmethod
    async def create(self, action: ActionRecord, ttl: float) -> ActionRecord:
        """Store ``action`` unless its creator has an action with the same ``request_id``
        already; the action stored under that request id (``action`` itself when new)."""

    @abc.abstractmethod
    async def get(self, action_id: str) -> ActionRecord | None: ...

    @abc.abstractmethod
    async def update(self, action: ActionRecord, ttl: float) -> bool:
        """Replace the action's record, if it still has one (not released, not expired);
        whether it did. The action and its request id now expire after ``ttl``."""

    @abc.abstractmethod
    async def release(self, action: ActionRecord) -> bool:
        """Forget the action and its request id; False if it was gone already."""


class TimerStore(abc.ABC):
    """Timers, each its creator's, and the times they run next (over every user, for the
    scheduler). Each run is claimed once (``claim``), however many broker replicas look for
    due timers at the same time."""

    @abc.abstractmethod
    async def create(self, timer: TimerRecord, max_timers: int = 0) -> bool:
        """Store a new timer (due at its ``next_run`` if it is active); False, changing nothing,
        when its user has ``max_timers`` timers already (0: no limit)."""

    @abc.abstractmethod
    async def get(self, timer_id: str) -> TimerRecord | None:
        """The timer with its runs."""

    @abc.abstractmethod
    async def by_user(self, user_id: str) -> list[TimerRecord]:
        """The user's timers, oldest first, without their runs."""

    @abc.abstractmethod
    async def delete(self, timer_id: str) -> bool:
        """Forget the timer and its runs; False if there was none."""

    @abc.abstractmethod
    async def pause(self, timer_id: str, reason: str = "") -> bool:
        """An active timer stops running until ``resume`` (its ``reason`` says why, when the
        broker paused it); whether it was active."""

    @abc.abstractmethod
    async def resume(self, timer_id: str, next_run: float | None) -> bool:
        """A paused timer runs again from ``next_run`` (None: its schedule has ended, so it
        is ``finished``), its pause's reason cleared; whether it was paused."""

    @abc.abstractmethod
    async def stop(self, timer_id: str, reason: str) -> bool:
        """An active or paused timer is ``stopped`` for good, saying ``reason``; whether it
        was active or paused."""

    @abc.abstractmethod
    async def due(self, at: float, limit: int) -> list[TimerRecord]:
        """Up to ``limit`` active timers whose ``next_run`` is at or before ``at``, earliest
        first, without their runs. One cheap call when none is due (it runs several times
        a second on every replica)."""

    @abc.abstractmethod
    async def claim(
        self, timer_id: str, due_at: float, next_at: float | None, at: float,
        stop_after_runs: int | None = None,
    ) -> TimerRun | None:
        """Record a run of the timer at ``at`` if it is still active and due at ``due_at``
        (the ``next_run`` the caller read), and make ``next_at`` its next run; the run, or
        None when another caller claimed it first (or it was paused, stopped or deleted).

        Atomic: of any number of callers with the same ``due_at``, one gets the run. With
        ``next_at`` None, or its ``stop_after_runs``-th run, the timer is ``finished``. The
        run has no task yet: the caller submits one and ``attach``-es it; until then the
        run is among the ``unsubmitted``.
        """

    @abc.abstractmethod
    async def unsubmitted(self, claimed_before: float, at: float, limit: int
                          ) -> list[tuple[str, int]]:
        """Up to ``limit`` runs ``(timer id, run number)`` claimed before ``claimed_before`` that
        have no task or error attached (the broker that claimed them stopped before it could),
        oldest first; each now counts as claimed at ``at``. A run leaves this list when it is
        attached (or its timer is deleted)."""

    @abc.abstractmethod
    async def attach(self, timer_id: str, run: TimerRun) -> None:
        """Replace the timer's run ``run.number`` (its task id or error now known), if the
        timer still keeps it."""


BLOB_CHUNK = 4 * 1024 * 1024
"""Bytes the data plane moves as one piece: big enough for throughput, small enough that a
transfer through a replica holds only a few in memory."""
BLOB_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
"""What a blob id looks like (``secrets.token_urlsafe``); anything else names no blob, and is
never made into a key or a path."""


class BlobMissing(Exception):  # noqa: N818 - a condition, like KeyError
    """A blob expired (or was removed) while it was being read."""


class OverBlobQuota(Exception):  # noqa: N818 - a condition the caller answers with 403
    """``BlobStore.write`` refused a blob: its owner's stored bytes would pass their quota."""

    def __init__(self, used: int, size: int, quota: int) -> None:
        super().__init__(f"{used} bytes stored, {size} more asked, quota {quota}")
        self.used, self.size, self.quota = used, size, quota


@dataclass
class Blob:
    """An open blob: its size, its bytes chunk by chunk (iterate once), and whose it is (the
    user its bytes count against; "" for a blob written without an owner)."""

    size: int
    chunks: AsyncIterator[bytes]
    owner: str = ""


class BlobLedger:
    """Bytes of blobs per owner, each blob counted until it expires or is released: the quota's
    bookkeeping for the in-process and file backends (the Redis one keeps it in Redis). Held in
    memory, so with the file backend each replica counts what it stored itself."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_owner: dict[str, dict[str, tuple[int, float]]] = {}
        """owner -> blob id -> (size, expires at)"""
        self._owner_of: dict[str, str] = {}

    def usage(self, owner: str) -> int:
        """The owner's bytes still counted (expired blobs forgotten on the way)."""
        held = self._by_owner.get(owner, {})
        now = self._clock()
        for gone in [b for b, (_, expires) in held.items() if expires <= now]:
            del held[gone]
            self._owner_of.pop(gone, None)
        return sum(size for size, _ in held.values())

    def reserve(self, owner: str, blob_id: str, size: int, ttl: float, quota: int) -> None:
        """Count ``size`` bytes of ``blob_id`` against ``owner``; ``OverBlobQuota`` (counting
        nothing) if that passes ``quota`` (0: no quota)."""
        used = self.usage(owner)
        if quota and used + size > quota:
            raise OverBlobQuota(used, size, quota)
        self._by_owner.setdefault(owner, {})[blob_id] = (size, self._clock() + ttl)
        self._owner_of[blob_id] = owner

    def touch(self, blob_id: str, ttl: float) -> None:
        owner = self._owner_of.get(blob_id)
        held = self._by_owner.get(owner, {}) if owner is not None else {}
        if blob_id in held:
            held[blob_id] = (held[blob_id][0], self._clock() + ttl)

    def release(self, blob_id: str) -> None:
        owner = self._owner_of.pop(blob_id, None)
        if owner is not None:
            held = self._by_owner.get(owner, {})
            held.pop(blob_id, None)
            if not held:
                self._by_owner.pop(owner, None)


class Backend:
    """What the broker does with the service behind a store at start, for ``/v1/health`` and at
    shutdown (nothing, for an in-process one)."""

    async def start(self) -> None:
        """Connect (and fail fast if the backing service does not answer)."""
        return None

    async def ping(self) -> None:
        """Return if the backing service answers now; raise otherwise (for ``/v1/health``)."""
        return None

    async def close(self) -> None:
        """Release connections."""
        return None


class BlobStore(Backend, abc.ABC):
    """Data-plane blobs: opaque bytes written once in chunks and read back in chunks by any
    replica, each expiring ``ttl`` seconds after it was written or last touched.

    Apart from ``Store``: blobs may live elsewhere than records (a directory every replica
    mounts). A blob is never held whole in a replica's memory on the way in or out.
    """

    @abc.abstractmethod
    async def write(self, blob_id: str, chunks: AsyncIterable[bytes], ttl: float,
                    owner: str = "", size: int = 0, quota: int = 0) -> int:
        """Store ``chunks`` as blob ``blob_id``; its size. Nobody sees the blob before every
        chunk is stored; if ``chunks`` raises, that propagates and nothing is stored.

        With an ``owner``, the blob's ``size`` (declared: the caller holds ``chunks`` to it)
        counts against the owner's stored bytes, from before the first chunk is read until
        the blob expires or is deleted; ``OverBlobQuota`` (nothing read, nothing counted) if
        that would pass ``quota`` (0: no quota)."""

    @abc.abstractmethod
    async def open(self, blob_id: str) -> Blob | None:
        """The blob, or None if it is unknown or expired; its chunks raise ``BlobMissing``
        if it expires while being read."""

    @abc.abstractmethod
    async def touch(self, blob_ids: list[str], ttl: float) -> None:
        """Make each blob that exists expire ``ttl`` seconds from now (others are ignored)."""

    @abc.abstractmethod
    async def delete(self, blob_ids: list[str]) -> None:
        """Remove blobs now (unknown ones are ignored); they stop counting against their owner."""

    @abc.abstractmethod
    async def usage(self, owner: str) -> int:
        """The bytes of blobs that count against ``owner`` now."""

    @abc.abstractmethod
    async def secret(self) -> bytes:
        """A random secret shared by every replica on the same backing service (the first to
        ask makes it); what the data plane's grants are signed with."""


async def write_behind(
    chunks: AsyncIterable[bytes], put: Callable[[int, bytes], Awaitable[None]]
) -> tuple[int, int]:
    """Hand each non-empty chunk to ``put(index, chunk)`` while the next one arrives, one
    ``put`` at a time (a writer holds about two chunks); ``(chunk count, size)``. Any
    exception (from ``chunks`` or ``put``) stops the running ``put`` and propagates."""
    pending: asyncio.Future[None] | None = None
    count = size = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(put(count, chunk))
            count += 1
            size += len(chunk)
        if pending is not None:
            await pending
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
        if pending is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await pending  # its own failure is retrieved, not left to the loop's log
    return count, size


class Store(Backend):
    """Durable broker state: the narrow parts above, from one backend."""

    users: UserStore
    functions: FunctionStore
    endpoints: EndpointStore
    tasks: TaskStore
    inflight: InflightStore
    unqueued: UnqueuedStore
    actions: ActionStore
    pubsub: PubSub
    timers: TimerStore

    async def broker_id(self) -> str:
        """This deployment's identity: made by the first replica to ask, then the same for every
        replica on the same backing service. Endpoints tell brokers apart by it, not by URL."""
        raise NotImplementedError


class LocalSubscription(Subscription):
    """Frames handed over in this process (``put``); the iteration ends at ``put(None)``."""

    def __init__(self, fanout: dict[str, set[LocalSubscription]], channel: str) -> None:
        self._fanout, self._channel = fanout, channel
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        fanout.setdefault(channel, set()).add(self)

    def put(self, frame: str | None) -> None:
        self._queue.put_nowait(frame)

    async def __aiter__(self) -> AsyncIterator[str]:
        while (frame := await self._queue.get()) is not None:
            yield frame

    async def close(self) -> None:
        subs = self._fanout.get(self._channel)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self._fanout[self._channel]
        self._queue.put_nowait(None)


def deliver_locally(fanout: dict[str, set[LocalSubscription]], channel: str, frame: str) -> None:
    for sub in list(fanout.get(channel, ())):
        sub.put(frame)
