"""In-process store for embedded mode and unit tests: same semantics as Redis, nothing persisted.

All methods run on one event loop, so each is atomic without locks.
"""

from __future__ import annotations

import copy

from farcall.broker.store.base import (
    TERMINAL,
    LocalSubscription,
    Principal,
    Record,
    Store,
    Subscription,
    deliver_locally,
)
from farcall.messages import ResultMessage, TaskResult, TaskState


class MemoryStore(Store):
    def __init__(self) -> None:
        self._users: dict[str, Record] = {}
        self._tokens: dict[str, Principal] = {}
        self._functions: dict[str, Record] = {}
        self._endpoints: dict[str, Record] = {}
        self._credentials: dict[str, str] = {}  # endpoint_id -> token hash
        self._sessions: dict[str, set[str]] = {}
        self._inflight: dict[str, dict[str, str]] = {}
        self._groups: dict[str, Record] = {}
        self._group_tasks: dict[str, list[str]] = {}
        self._tasks: dict[str, Record] = {}
        self._subscribers: dict[str, set[LocalSubscription]] = {}
        self._queued: dict[str, int] = {}

    # ------------------------------------------------------------ users and tokens
    async def create_user(self, user: Record, token_hash: str) -> None:
        self._users[user["user_id"]] = dict(user)
        self._tokens[token_hash] = Principal("user", user["user_id"], token_hash)

    async def resolve_token(self, token_hash: str) -> Principal | None:
        return self._tokens.get(token_hash)

    # ------------------------------------------------------------ functions
    async def put_function(self, function: Record) -> None:
        self._functions[function["function_id"]] = dict(function)

    async def get_functions(self, function_ids: list[str]) -> dict[str, Record]:
        return {f: dict(self._functions[f]) for f in function_ids if f in self._functions}

    async def delete_function(self, function_id: str) -> None:
        self._functions.pop(function_id, None)

    # ------------------------------------------------------------ endpoints
    async def put_endpoint(self, endpoint: Record, credential_hash: str) -> None:
        eid = endpoint["endpoint_id"]
        self._endpoints[eid] = {
            "last_heartbeat": None,
            "last_seen": None,
            "heartbeat": {},
            **endpoint,
        }
        self._credentials[eid] = credential_hash
        self._tokens[credential_hash] = Principal("endpoint", eid, credential_hash)

    async def get_endpoint(self, endpoint_id: str) -> Record | None:
        ep = self._endpoints.get(endpoint_id)
        if ep is None:
            return None
        return {
            **copy.deepcopy(ep),
            "connected": bool(self._sessions.get(endpoint_id)),
            "queued_tasks": max(0, self._queued.get(endpoint_id, 0)),
        }

    async def list_endpoints(self, user_id: str) -> list[Record]:
        ids = [e for e, rec in self._endpoints.items() if rec["user_id"] == user_id]
        return [r for e in ids if (r := await self.get_endpoint(e)) is not None]

    async def delete_endpoint(self, endpoint_id: str) -> None:
        self._endpoints.pop(endpoint_id, None)
        self._tokens.pop(self._credentials.pop(endpoint_id, ""), None)
        self._sessions.pop(endpoint_id, None)
        self._inflight.pop(endpoint_id, None)
        self._queued.pop(endpoint_id, None)

    async def set_connected(
        self, endpoint_id: str, session_id: str, connected: bool, at: float
    ) -> None:
        sessions = self._sessions.setdefault(endpoint_id, set())
        if connected:
            sessions.add(session_id)
        else:
            sessions.discard(session_id)
        await self.touch_endpoint(endpoint_id, at)

    async def set_heartbeat(self, endpoint_id: str, heartbeat: Record, at: float) -> None:
        ep = self._endpoints.get(endpoint_id)
        if ep is not None:
            ep.update(heartbeat=copy.deepcopy(heartbeat), last_heartbeat=at, last_seen=at)

    async def touch_endpoint(self, endpoint_id: str, at: float) -> None:
        ep = self._endpoints.get(endpoint_id)
        if ep is not None:
            ep["last_seen"] = at

    # ------------------------------------------------------------ task groups
    async def create_task_group(self, task_group_id: str, user_id: str, at: float) -> None:
        self._groups[task_group_id] = {"user_id": user_id, "created_at": at}
        self._group_tasks.setdefault(task_group_id, [])

    async def get_task_group_owner(self, task_group_id: str) -> str | None:
        group = self._groups.get(task_group_id)
        return group["user_id"] if group else None

    async def get_task_group_tasks(self, task_group_id: str) -> list[str]:
        return list(self._group_tasks.get(task_group_id, []))

    # ------------------------------------------------------------ tasks
    async def submit_context(
        self, endpoint_id: str, function_ids: list[str], task_group_id: str | None
    ) -> tuple[str | None, dict[str, Record], str | None]:
        ep = self._endpoints.get(endpoint_id)
        owner = None if task_group_id is None else await self.get_task_group_owner(task_group_id)
        return (ep["user_id"] if ep else None), await self.get_functions(function_ids), owner

    async def create_tasks(
        self,
        tasks: list[Record],
        new_group: Record | None = None,
        inflight: dict[str, str] | None = None,
    ) -> None:
        if new_group is not None:
            await self.create_task_group(
                new_group["task_group_id"], new_group["user_id"], new_group["created_at"]
            )
        if tasks:
            await self.count_queued(tasks[0]["endpoint_id"], len(tasks) - len(inflight or ()))
            if inflight:
                self._inflight.setdefault(tasks[0]["endpoint_id"], {}).update(inflight)
        for task in tasks:
            record = copy.deepcopy(task)
            record.update(data="", error="", completed_at=None, worker=None)
            self._tasks[task["task_id"]] = record
            self._group_tasks.setdefault(task["task_group_id"], []).append(task["task_id"])

    async def get_tasks(self, task_ids: list[str]) -> list[Record | None]:
        return [
            copy.deepcopy(t) if (t := self._tasks.get(i)) is not None else None for i in task_ids
        ]

    async def fail_tasks(self, task_ids: list[str], error: str, at: float) -> None:
        for task_id in task_ids:
            task = self._tasks.get(task_id)
            if task is not None and task["state"] not in TERMINAL:
                task.update(state=TaskState.FAILED.value, error=error, completed_at=at)
                task["transitions"][TaskState.FAILED.value] = at

    # ------------------------------------------------------------ endpoint channel
    async def count_queued(self, endpoint_id: str, delta: int) -> None:
        self._queued[endpoint_id] = self._queued.get(endpoint_id, 0) + delta

    async def dispatch(self, endpoint_id: str, tasks: dict[str, str], taken: int) -> list[str]:
        await self.count_queued(endpoint_id, -taken)
        inflight = self._inflight.setdefault(endpoint_id, {})
        accepted = []
        for task_id, body in tasks.items():
            task = self._tasks.get(task_id)
            if (
                task is not None
                and task["endpoint_id"] == endpoint_id
                and task["state"] not in TERMINAL
            ):
                inflight[task_id] = body
                accepted.append(task_id)
        return accepted

    async def get_inflight(self, endpoint_id: str) -> dict[str, str]:
        return dict(self._inflight.get(endpoint_id, {}))

    async def remove_inflight(self, endpoint_id: str, task_ids: list[str]) -> None:
        inflight = self._inflight.get(endpoint_id, {})
        for task_id in task_ids:
            inflight.pop(task_id, None)

    async def mark_running(self, endpoint_id: str, started: dict[str, float]) -> None:
        for task_id, at in started.items():
            task = self._tasks.get(task_id)
            if (
                task is not None
                and task["endpoint_id"] == endpoint_id
                and task["state"] not in TERMINAL
            ):
                task["state"] = TaskState.RUNNING.value
                task["transitions"][TaskState.RUNNING.value] = at

    async def complete(
        self, endpoint_id: str, results: list[ResultMessage], at: float
    ) -> list[tuple[str, TaskResult]]:
        await self.remove_inflight(endpoint_id, [r.task_id for r in results])
        done = []
        for r in results:
            task = self._tasks.get(r.task_id)
            if task is None or task["endpoint_id"] != endpoint_id or task["state"] in TERMINAL:
                continue
            state = TaskState(r.state).value
            task.update(
                state=state,
                data=r.data,
                error=r.error,
                completed_at=at,
                worker=r.worker.model_dump() if r.worker else None,
            )
            if r.started_at is not None:
                task["transitions"].setdefault(TaskState.RUNNING.value, r.started_at)
            task["transitions"][state] = at
            done.append((task["task_group_id"], TaskResult.stored(r, at)))
        return done

    # ------------------------------------------------------------ result fan-out
    async def publish_results(self, task_group_id: str, frame: str) -> None:
        deliver_locally(self._subscribers, task_group_id, frame)

    async def subscribe_results(self, task_group_id: str) -> Subscription:
        return LocalSubscription(self._subscribers, task_group_id)
