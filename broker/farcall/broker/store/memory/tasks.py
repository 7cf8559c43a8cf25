"""In-process ``TaskStore``: task groups, task records and their life cycle, each user's
open-task count and index of recent groups."""

from __future__ import annotations

from farcall.broker.records import NewTasks, TaskGroupRecord, TaskRecord
from farcall.broker.store.base import (
    ABANDONED,
    CANCELLED_ERROR,
    AlreadySubmitted,
    Cancelled,
    GroupActivity,
    OverQuota,
    SubmissionContext,
    Submitted,
    TaskStore,
    UnqueuedBatch,
    owner_cancelled,
)
from farcall.broker.store.memory.state import State
from farcall.protocol.channel import ResultMessage, join_task_batch
from farcall.protocol.common import TaskState
from farcall.protocol.stream import TaskResult


class MemoryTasks(TaskStore):
    def __init__(self, state: State) -> None:
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
                                 functions, owner, bool(ep and ep.multi_user),
                                 ep.parent_id if ep else "")

    async def create(
        self, batch: NewTasks, inflight: dict[str, str] | None = None, session_id: str = "",
        max_open: int = 0, queued_body: bytes = b"",
    ) -> bool:
        s = self._s
        request = (batch.user_id, batch.request_id)
        if batch.request_id and (prior := s.requests.get(request)) is not None:
            raise AlreadySubmitted(prior)
        current = s.open_tasks.get(batch.user_id, 0)
        if max_open > 0 and batch.task_ids and current + len(batch.task_ids) > max_open:
            raise OverQuota(current, max_open)
        s.open_tasks[batch.user_id] = current + len(batch.task_ids)
        s.open_ids.setdefault(batch.user_id, set()).update(batch.task_ids)
        if batch.request_id:
            s.requests[request] = Submitted(batch.endpoint_id, batch.task_group_id,
                                            list(batch.task_ids))
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
        elif batch.task_ids:
            body = join_task_batch(list(inflight.values())) if inflight else queued_body
            s.unqueued[batch.batch_id] = (batch.received_at,
                                          UnqueuedBatch(batch.batch_id, eid, body))
        for record in batch.records():
            s.tasks[record.task_id] = record
        s.group_tasks.setdefault(batch.task_group_id, []).extend(batch.task_ids)
        s.group_active(batch.user_id, batch.task_group_id, batch.received_at)
        return direct

    async def submitted(self, user_id: str, request_id: str, abandon: bool = False
                        ) -> Submitted | None:
        found = self._s.requests.get((user_id, request_id))
        if found is None and abandon:
            found = self._s.requests[(user_id, request_id)] = ABANDONED
        return found

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

    async def open_task_ids(self, user_id: str) -> list[str]:
        return sorted(self._s.open_ids.get(user_id, ()))

    async def cancel(
        self, user_id: str | None, task_ids: list[str], only_queued: bool, at: float,
        error: str = CANCELLED_ERROR,
    ) -> Cancelled:
        results = []
        unchanged = {}
        endpoints = self._s.endpoints
        for task_id in dict.fromkeys(task_ids):
            task = self._s.tasks.get(task_id)
            ep = endpoints.get(task.endpoint_id) if task is not None else None
            if task is None or (user_id is not None and task.user_id != user_id
                                and (ep is None or ep.user_id != user_id)):
                unchanged[task_id] = "not_found"
            elif task.state.terminal or (only_queued and task.state == TaskState.RUNNING):
                unchanged[task_id] = task.state.value
            else:
                why = (owner_cancelled(task.endpoint_id)
                       if user_id is not None and task.user_id != user_id else error)
                result = self._s.end(task, TaskState.CANCELLED, why, at)
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
