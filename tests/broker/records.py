"""The broker tests' one set of record builders: each gives a valid record with the fewest
arguments, and keyword overrides for whatever a test looks at. Also the two store calls the store
tests repeat: submit a batch, and read back one task's record."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from farcall.broker.records import (
    ActionRecord,
    EndpointRecord,
    FunctionRecord,
    NewTasks,
    TaskRecord,
    TimerRecord,
    TokenRecord,
    UserRecord,
)
from farcall.broker.store.base import Store
from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import TaskState, Versions, now
from farcall.protocol.timers import TimerSchedule

SUBMITTER = Versions(python="3.11.7", dill="0.4.1", farcall="0.1.0")
"""What the SDK said of itself with each batch ``new_tasks`` makes."""
WORKER = Versions(python="3.11.7", dill="0.4.1")
"""What a worker says of itself with each result ``result_message`` makes."""


def new_id() -> str:
    return uuid.uuid4().hex


def user_record(user_id: str, name: str) -> UserRecord:
    return UserRecord(user_id=user_id, name=name, created_at=1.5)


def token_record(token_id: str, user_id: str, created_at: float) -> TokenRecord:
    """A user token whose hash is ``hash-<token id>``."""
    return TokenRecord(token_id=token_id, user_id=user_id, name=f"name of {token_id}",
                       created_at=created_at, token_hash=f"hash-{token_id}")


def function_record(function_id: str = "f1", user_id: str = "u1", **fields: Any) -> FunctionRecord:
    return FunctionRecord.model_validate({
        "function_id": function_id, "user_id": user_id, "function": "PAYLOAD",
        "created_at": now(), **fields})


def endpoint_record(endpoint_id: str = "ep1", user_id: str = "u1", **fields: Any) -> EndpointRecord:
    return EndpointRecord.model_validate({
        "endpoint_id": endpoint_id, "user_id": user_id, "name": "laptop", "created_at": now(),
        **fields})


def new_tasks(
    n: int, at: float | None = None, *, endpoint: str = "ep1", user: str = "u1",
    group: str | None = None, function_id: str = "f1", submitter: Versions | None = SUBMITTER,
) -> NewTasks:
    """A batch of ``n`` tasks received at ``at`` (now if None), in a new group unless ``group``."""
    t = now() if at is None else at
    return NewTasks(
        user_id=user, task_group_id=group or new_id(), endpoint_id=endpoint,
        task_ids=[new_id() for _ in range(n)], function_ids=[function_id] * n,
        received_at=t, waiting_at=t + 0.001, submitter=submitter, new_group=group is None,
    )


def result_message(
    task_id: str, data: str = "ok",
    state: Literal[TaskState.SUCCESS, TaskState.FAILED] = TaskState.SUCCESS,
) -> ResultMessage:
    """What an endpoint sends for a task that ran, having started half a second ago."""
    return ResultMessage(task_id=task_id, state=state, data=data, started_at=now() - 0.5,
                         worker=WORKER)


def action_record(user: str = "u1", request_id: str = "r1", **fields: Any) -> ActionRecord:
    return ActionRecord.model_validate({
        "action_id": str(uuid.uuid4()), "user_id": user, "request_id": request_id,
        "request_digest": "d1", "created_at": now(), "release_after": 60.0, "task_count": 2,
        **fields})


def timer_record(user: str = "u1", next_run: float | None = 100.0, **fields: Any) -> TimerRecord:
    """An active timer every 10 s, due at ``next_run``."""
    return TimerRecord.model_validate({
        "timer_id": str(uuid.uuid4()), "user_id": user, "name": "nightly", "endpoint_id": "ep1",
        "function_id": "f1", "args": "ARGS", "schedule": TimerSchedule(interval=10.0),
        "next_run": next_run, "created_at": now(), **fields})


async def submitted(store: Store, n: int, endpoint: str = "ep1") -> tuple[str, list[str]]:
    """Submit ``new_tasks(n)`` to ``store`` (queued, not in flight); its group and task ids."""
    batch = new_tasks(n, endpoint=endpoint)
    await store.tasks.create(batch)
    return batch.task_group_id, batch.task_ids


async def stored_task(store: Store, task_id: str) -> TaskRecord:
    (rec,) = await store.tasks.get_many([task_id])
    assert rec is not None, f"task {task_id} is not in the store"
    return rec
