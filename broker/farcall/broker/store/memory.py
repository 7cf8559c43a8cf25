"""In-process store for embedded mode and unit tests: same semantics as Redis, nothing persisted.

All methods run on one event loop, so each is atomic without locks. The parts
share one ``_State``, as the Redis parts share one database. Records handed out
are copies, so a caller cannot change the store by changing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from farcall.broker.records import (
    EndpointRecord,
    FunctionRecord,
    NewTasks,
    TaskGroupRecord,
    TaskRecord,
    TokenRecord,
    UserRecord,
)
from farcall.broker.store.base import (
    CANCELLED_ERROR,
    CRASH_ATTEMPT,
    LOST_ATTEMPT,
    MAX_USER_GROUPS,
    Cancelled,
    EndpointStore,
    FunctionStore,
    GroupActivity,
    InflightStore,
    LocalSubscription,
    OverQuota,
    Principal,
    PubSub,
    Reconciled,
    Store,
    SubmissionContext,
    Subscription,
    TaskStore,
    UserStore,
    crash_failure,
    deliver_locally,
)
from farcall.broker.store.memory_actions import MemoryActions
from farcall.broker.store.memory_timers import MemoryTimers
from farcall.protocol.channel import Heartbeat, ResultMessage
from farcall.protocol.common import Attempt, TaskState
from farcall.protocol.stream import TaskResult


@dataclass
class _State:
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
    queued: dict[str, int] = field(default_factory=dict)
    inflight: dict[str, dict[str, str]] = field(default_factory=dict)
    groups: dict[str, TaskGroupRecord] = field(default_factory=dict)
    group_tasks: dict[str, list[str]] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    open_tasks: dict[str, int] = field(default_factory=dict)
    """user id -> tasks not terminal yet"""
    user_groups: dict[str, dict[str, float]] = field(default_factory=dict)
    """user id -> task group id -> when last submitted to (the index of recent groups)"""
    subscribers: dict[str, set[LocalSubscription]] = field(default_factory=dict)

    def closed(self, task: TaskRecord) -> None:
        """``task`` just became terminal: it leaves its user's count of open tasks."""
        self.open_tasks[task.user_id] = max(0, self.open_tasks.get(task.user_id, 0) - 1)

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


class MemoryUsers(UserStore):
    def __init__(self, state: _State) -> None:
        self._s = state

    async def create(self, user: UserRecord, token: TokenRecord) -> bool:
        if user.name in self._s.names:
            return False
        self._s.names[user.name] = user.user_id
        self._s.users[user.user_id] = user.model_copy()
        await self.add_token(token)
        return True

    async def get(self, user_id: str) -> UserRecord | None:
        user = self._s.users.get(user_id)
        return None if user is None else user.model_copy()

    async def get_many(self, user_ids: list[str]) -> dict[str, UserRecord]:
        users = self._s.users
        return {u: users[u].model_copy() for u in user_ids if u in users}

    async def by_name(self, name: str) -> UserRecord | None:
        user_id = self._s.names.get(name)
        return None if user_id is None else await self.get(user_id)

    async def add_token(self, token: TokenRecord) -> None:
        self._s.user_tokens[token.token_id] = token.model_copy()
        self._s.tokens[token.token_hash] = Principal(
            "user", token.user_id, token.token_hash, token.token_id)

    async def list_tokens(self, user_id: str | None = None) -> list[TokenRecord]:
        found = [t.model_copy() for t in self._s.user_tokens.values()
                 if user_id is None or t.user_id == user_id]
        return sorted(found, key=lambda t: (t.created_at, t.token_id))

    async def revoke_token(self, token_id: str, user_id: str | None = None) -> TokenRecord | None:
        token = self._s.user_tokens.get(token_id)
        if token is None or (user_id is not None and token.user_id != user_id):
            return None
        del self._s.user_tokens[token_id]
        self._s.tokens.pop(token.token_hash, None)
        return token

    async def resolve_token(self, token_hash: str) -> Principal | None:
        return self._s.tokens.get(token_hash)


class MemoryFunctions(FunctionStore):
    def __init__(self, state: _State) -> None:
        self._s = state

    async def put(self, function: FunctionRecord) -> None:
        self._s.functions[function.function_id] = function.model_copy(
            update={"shared_with": sorted(set(function.shared_with))})

    async def get_many(self, function_ids: list[str]) -> dict[str, FunctionRecord]:
        found = self._s.functions
        return {f: found[f].model_copy(deep=True) for f in function_ids if f in found}

    async def delete(self, function_id: str) -> None:
        self._s.functions.pop(function_id, None)

    async def count(self, user_id: str) -> int:
        return sum(1 for f in self._s.functions.values() if f.user_id == user_id)

    async def share(
        self, function_id: str, user_id: str | None, public: bool | None, shared: bool
    ) -> None:
        fn = self._s.functions.get(function_id)
        if fn is None:
            return
        if user_id is not None:
            fn.shared_with = _shared(fn.shared_with, user_id, shared)
        if public:
            fn.public = shared


class MemoryEndpoints(EndpointStore):
    def __init__(self, state: _State) -> None:
        self._s = state

    async def put(self, endpoint: EndpointRecord, credential_hash: str) -> None:
        eid = endpoint.endpoint_id
        self._s.endpoints[eid] = endpoint.model_copy(
            deep=True, update={"shared_with": sorted(set(endpoint.shared_with))})
        self._s.credentials[eid] = credential_hash
        self._s.tokens[credential_hash] = Principal("endpoint", eid, credential_hash)

    async def get(self, endpoint_id: str) -> EndpointRecord | None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is None:
            return None
        return ep.model_copy(deep=True, update={
            "connected": bool(self._s.sessions.get(endpoint_id)),
            "queued_tasks": max(0, self._s.queued.get(endpoint_id, 0)),
        })

    async def list(self, user_id: str) -> list[EndpointRecord]:
        ids = sorted(e for e, rec in self._s.endpoints.items() if rec.usable_by(user_id))
        return [r for e in ids if (r := await self.get(e)) is not None]

    async def delete(self, endpoint_id: str) -> None:
        s = self._s
        s.endpoints.pop(endpoint_id, None)
        s.tokens.pop(s.credentials.pop(endpoint_id, ""), None)
        s.sessions.pop(endpoint_id, None)
        s.live.pop(endpoint_id, None)
        s.inflight.pop(endpoint_id, None)
        s.queued.pop(endpoint_id, None)

    async def share(self, endpoint_id: str, user_id: str, shared: bool) -> None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None:
            ep.shared_with = _shared(ep.shared_with, user_id, shared)

    async def connect_session(
        self, endpoint_id: str, session_id: str, heartbeat_period: float | None, at: float
    ) -> str | None:
        self._s.sessions.setdefault(endpoint_id, set()).add(session_id)
        previous = self._s.live.get(endpoint_id)
        self._s.live[endpoint_id] = session_id
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None and heartbeat_period is not None:
            ep.heartbeat_period = heartbeat_period
        await self.touch(endpoint_id, at)
        return previous

    async def disconnect_session(self, endpoint_id: str, session_id: str, at: float) -> None:
        self._s.sessions.get(endpoint_id, set()).discard(session_id)
        if self._s.live.get(endpoint_id) == session_id:
            del self._s.live[endpoint_id]
        await self.touch(endpoint_id, at)

    async def live_session(self, endpoint_id: str) -> str | None:
        return self._s.live.get(endpoint_id)

    async def set_heartbeat(self, endpoint_id: str, heartbeat: Heartbeat, at: float) -> None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None:
            ep.heartbeat = heartbeat.model_copy(deep=True)
            ep.last_heartbeat = ep.last_seen = at

    async def touch(self, endpoint_id: str, at: float) -> None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None:
            ep.last_seen = at

    async def count_queued(self, endpoint_id: str, delta: int) -> None:
        self._s.queued[endpoint_id] = self._s.queued.get(endpoint_id, 0) + delta


class MemoryTasks(TaskStore):
    def __init__(self, state: _State) -> None:
        self._s = state

    async def create_group(self, group: TaskGroupRecord) -> None:
        self._s.groups[group.task_group_id] = group.model_copy()
        self._s.group_tasks.setdefault(group.task_group_id, [])
        self._s.group_active(group.user_id, group.task_group_id, group.created_at)

    async def group_owner(self, task_group_id: str) -> str | None:
        group = self._s.groups.get(task_group_id)
        return group.user_id if group else None

    async def group_tasks(self, task_group_id: str, last: int | None = None) -> list[str]:
        ids = self._s.group_tasks.get(task_group_id, [])
        return list(ids if last is None else ids[-last:] if last > 0 else [])

    async def recent_groups(self, user_id: str, limit: int, offset: int = 0) -> list[GroupActivity]:
        index = self._s.user_groups.get(user_id, {})
        newest = sorted(index, key=lambda g: (index[g], g), reverse=True)[offset : offset + limit]
        return [GroupActivity(g, self._s.groups[g].created_at, index[g],
                              len(self._s.group_tasks.get(g, ())))
                for g in newest if g in self._s.groups]

    async def summaries(self, task_ids: list[str]) -> list[TaskRecord | None]:
        tasks = self._s.tasks
        return [None if (t := tasks.get(i)) is None else TaskRecord.model_construct(
                    task_id=t.task_id, user_id=t.user_id, task_group_id=t.task_group_id,
                    endpoint_id=t.endpoint_id, function_id=t.function_id, state=t.state,
                    transitions={k: v for k, v in t.transitions.items()
                                 if k == TaskState.RECEIVED.value},
                    data="", error="", completed_at=t.completed_at, submitter=None, worker=None,
                    attempts=[])
                for i in task_ids]

    async def submission_context(
        self, endpoint_id: str, function_ids: list[str], task_group_id: str | None
    ) -> SubmissionContext:
        ep = self._s.endpoints.get(endpoint_id)
        functions = {f: rec.model_copy(deep=True)
                     for f in function_ids if (rec := self._s.functions.get(f))}
        owner = None if task_group_id is None else await self.group_owner(task_group_id)
        return SubmissionContext(ep.user_id if ep else None,
                                 frozenset(ep.shared_with) if ep else frozenset(),
                                 functions, owner)

    async def create(
        self, batch: NewTasks, inflight: dict[str, str] | None = None, session_id: str = "",
        max_open: int = 0,
    ) -> bool:
        s = self._s
        current = s.open_tasks.get(batch.user_id, 0)
        if max_open > 0 and batch.task_ids and current + len(batch.task_ids) > max_open:
            raise OverQuota(current, max_open)
        s.open_tasks[batch.user_id] = current + len(batch.task_ids)
        if batch.new_group:
            await self.create_group(TaskGroupRecord(
                task_group_id=batch.task_group_id, user_id=batch.user_id,
                created_at=batch.received_at))
        eid = batch.endpoint_id
        direct = bool(inflight) and s.live.get(eid) == session_id
        s.queued[eid] = s.queued.get(eid, 0) + len(batch.task_ids) - (
            len(inflight or ()) if direct else 0)
        if direct and inflight:
            s.inflight.setdefault(eid, {}).update(inflight)
        for record in batch.records():
            s.tasks[record.task_id] = record
        s.group_tasks.setdefault(batch.task_group_id, []).extend(batch.task_ids)
        s.group_active(batch.user_id, batch.task_group_id, batch.received_at)
        return direct

    async def get_many(self, task_ids: list[str]) -> list[TaskRecord | None]:
        tasks = self._s.tasks
        return [t.model_copy(deep=True) if (t := tasks.get(i)) is not None else None
                for i in task_ids]

    async def open_tasks(self, user_id: str) -> int:
        return self._s.open_tasks.get(user_id, 0)

    async def fail(self, task_ids: list[str], error: str, at: float) -> list[tuple[str, TaskResult]]:
        done = []
        for task_id in task_ids:
            task = self._s.tasks.get(task_id)
            if task is not None and not task.state.terminal:
                done.append((task.task_group_id, self._s.end(task, TaskState.FAILED, error, at)))
        return done

    async def cancel(
        self, user_id: str, task_ids: list[str], only_queued: bool, at: float
    ) -> Cancelled:
        results = []
        unchanged = {}
        for task_id in dict.fromkeys(task_ids):
            task = self._s.tasks.get(task_id)
            if task is None or task.user_id != user_id:
                unchanged[task_id] = "not_found"
            elif task.state.terminal or (only_queued and task.state == TaskState.RUNNING):
                unchanged[task_id] = task.state.value
            else:
                result = self._s.end(task, TaskState.CANCELLED, CANCELLED_ERROR, at)
                self._s.inflight.get(task.endpoint_id, {}).pop(task_id, None)
                results.append((task.task_group_id, task.endpoint_id, result))
        return Cancelled(results, unchanged)

    async def mark_running(self, endpoint_id: str, started: dict[str, float]) -> None:
        for task_id, at in started.items():
            task = self._s.live_task(task_id, endpoint_id)
            if task is not None:
                task.state = TaskState.RUNNING
                task.transitions[TaskState.RUNNING.value] = at

    async def complete(
        self, endpoint_id: str, results: list[ResultMessage], at: float
    ) -> list[tuple[str, TaskResult]]:
        inflight = self._s.inflight.get(endpoint_id, {})
        done = []
        for r in results:
            inflight.pop(r.task_id, None)
            task = self._s.live_task(r.task_id, endpoint_id)
            if task is None:
                continue
            task.state = TaskState(r.state)
            task.data, task.error, task.completed_at, task.worker = r.data, r.error, at, r.worker
            if r.attempts:
                task.attempts = sorted([*task.attempts, *r.attempts], key=lambda a: a.at)
            if r.started_at is not None:
                task.transitions.setdefault(TaskState.RUNNING.value, r.started_at)
            task.transitions[task.state.value] = at
            self._s.closed(task)
            done.append((task.task_group_id, TaskResult.stored(r, at)))
        return done


class MemoryInflight(InflightStore):
    def __init__(self, state: _State) -> None:
        self._s = state

    async def add(
        self, endpoint_id: str, session_id: str, tasks: dict[str, str], taken: int
    ) -> list[str] | None:
        s = self._s
        if s.live.get(endpoint_id) != session_id:
            return None
        s.queued[endpoint_id] = s.queued.get(endpoint_id, 0) - taken
        inflight = s.inflight.setdefault(endpoint_id, {})
        accepted = []
        for task_id, body in tasks.items():
            if s.live_task(task_id, endpoint_id) is not None:
                inflight[task_id] = body
                accepted.append(task_id)
        return accepted

    async def get(self, endpoint_id: str) -> dict[str, str]:
        return dict(self._s.inflight.get(endpoint_id, {}))

    async def reconcile(
        self, endpoint_id: str, held: set[str], crashed: set[str], max_losses: int, at: float
    ) -> Reconciled:
        s = self._s
        inflight = s.inflight.get(endpoint_id, {})
        again: dict[str, str] = {}
        failed: list[tuple[str, TaskResult]] = []
        dropped = 0
        for task_id in [t for t in inflight if t not in held]:
            task = s.live_task(task_id, endpoint_id)
            if task is None:
                del inflight[task_id]
                dropped += 1
                continue
            is_crash = task_id in crashed
            task.attempts.append(Attempt(at=at, error=CRASH_ATTEMPT if is_crash else LOST_ATTEMPT))
            if is_crash:
                s.crashes[task_id] = s.crashes.get(task_id, 0) + 1
            if is_crash and s.crashes[task_id] >= max_losses:
                result = s.end(task, TaskState.FAILED, crash_failure(max_losses), at)
                del inflight[task_id]
                failed.append((task.task_group_id, result))
            else:
                again[task_id] = inflight[task_id]
        return Reconciled(again, failed, dropped)

    async def remove(self, endpoint_id: str, task_ids: list[str]) -> None:
        inflight = self._s.inflight.get(endpoint_id, {})
        for task_id in task_ids:
            inflight.pop(task_id, None)


class MemoryPubSub(PubSub):
    def __init__(self, state: _State) -> None:
        self._s = state

    async def publish(self, channel: str, frame: str) -> None:
        deliver_locally(self._s.subscribers, channel, frame)

    async def subscribe(self, channel: str) -> Subscription:
        return LocalSubscription(self._s.subscribers, channel)


class MemoryStore(Store):
    def __init__(self) -> None:
        state = _State()
        self.users = MemoryUsers(state)
        self.functions = MemoryFunctions(state)
        self.endpoints = MemoryEndpoints(state)
        self.tasks = MemoryTasks(state)
        self.inflight = MemoryInflight(state)
        self.actions = MemoryActions()
        self.pubsub = MemoryPubSub(state)
        self.timers = MemoryTimers()


def _shared(user_ids: list[str], user_id: str, shared: bool) -> list[str]:
    """``user_ids`` with ``user_id`` added (``shared``) or removed, sorted as Redis hands them out."""
    return sorted(set(user_ids) | {user_id} if shared else set(user_ids) - {user_id})
