"""A user's recent work, newest first: ``GET /v1/task_groups`` and ``GET /v1/tasks``.

Read from the store's per-user index of recent groups and from a few small fields of
each task (``TaskStore.summaries``), never from a result, so a listing costs a handful
of store round trips whatever the tasks returned.
"""

from __future__ import annotations

from farcall.broker.errors import ObjectNotFound, clip
from farcall.broker.records import TaskRecord
from farcall.broker.services import Services
from farcall.broker.store.base import MAX_USER_GROUPS, TaskStore
from farcall.protocol.common import TaskState
from farcall.protocol.rest import TaskGroupList, TaskGroupSummary, TaskList, TaskSummary

MAX_LIMIT = 1000
"""Most groups or tasks one listing returns."""
PAGE = 50
"""Groups read from the index at a time while looking for the newest tasks."""


async def task_groups(svc: Services, user: str, limit: int) -> TaskGroupList:
    groups = await svc.store.tasks.recent_groups(user, limit)
    return TaskGroupList(task_groups=[
        TaskGroupSummary(task_group_id=g.task_group_id, created_at=g.created_at,
                         last_active=g.last_active, task_count=g.task_count)
        for g in groups])


async def tasks(svc: Services, user: str, limit: int, task_group_id: str | None) -> TaskList:
    """The user's ``limit`` most recently submitted tasks, of one group or of all."""
    store = svc.store.tasks
    if task_group_id is None:
        newest = await _across_groups(store, user, limit)
    elif await store.group_owner(task_group_id) != user:
        raise ObjectNotFound(f"task group {clip(task_group_id)} not found; list yours with "
                             "GET /v1/task_groups")
    else:
        newest = await _mine(store, user, await store.group_tasks(task_group_id, last=limit))
    return TaskList(tasks=await _summaries(svc, user, newest))


async def _across_groups(store: TaskStore, user: str, limit: int) -> list[TaskRecord]:
    """Groups are visited the most recently active first; the walk stops at a group last
    submitted to before every task kept, since none of its tasks can be newer."""
    newest: list[TaskRecord] = []
    for offset in range(0, MAX_USER_GROUPS, PAGE):
        page = await store.recent_groups(user, PAGE, offset)
        if not page:
            break
        for group in page:
            if len(newest) >= limit and group.last_active < _received(newest[-1]):
                return newest
            found = await _mine(store, user, await store.group_tasks(group.task_group_id, last=limit))
            # stable: tasks of one batch (the same time) stay newest first
            newest = sorted(newest + found, key=_received, reverse=True)[:limit]
    return newest


async def _mine(store: TaskStore, user: str, task_ids: list[str]) -> list[TaskRecord]:
    """The user's tasks among ``task_ids`` (in submission order), the last submitted first."""
    found = await store.summaries(task_ids[::-1])
    return [r for r in found if r is not None and r.user_id == user]


def _received(task: TaskRecord) -> float:
    return task.transitions.get(TaskState.RECEIVED.value, 0.0)


async def _summaries(svc: Services, user: str, records: list[TaskRecord]) -> list[TaskSummary]:
    functions = await svc.store.functions.get_many(list({r.function_id for r in records}))
    names = {f: rec.function_name for f, rec in functions.items() if rec.usable_by(user)}
    return [TaskSummary(task_id=r.task_id, task_group_id=r.task_group_id,
                        endpoint_id=r.endpoint_id, function_id=r.function_id,
                        function_name=names.get(r.function_id, ""), state=r.state,
                        received_at=r.transitions.get(TaskState.RECEIVED.value),
                        completed_at=r.completed_at)
            for r in records]
