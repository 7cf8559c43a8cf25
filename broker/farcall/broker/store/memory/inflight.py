"""In-process ``InflightStore``: per endpoint, the tasks a channel session took."""

from __future__ import annotations

from farcall.broker.store.base import (
    CRASH_ATTEMPT,
    LOST_ATTEMPT,
    InflightStore,
    Reconciled,
    crash_failure,
)
from farcall.broker.store.memory.state import State
from farcall.protocol.common import Attempt, TaskState
from farcall.protocol.stream import TaskResult


class MemoryInflight(InflightStore):
    def __init__(self, state: State) -> None:
        self._s = state

    async def add(
        self, endpoint_id: str, session_id: str, tasks: dict[str, str], taken: int
    ) -> list[str] | None:
        s = self._s
        if s.live.get(endpoint_id) != session_id:
            return None
        s.queued[endpoint_id] = max(0, s.queued.get(endpoint_id, 0) - taken)
        inflight = s.inflight.setdefault(endpoint_id, {})
        accepted = []
        for task_id, body in tasks.items():
            if s.live_task(task_id, endpoint_id) is not None:
                inflight[task_id] = body
                accepted.append(task_id)
        return accepted

    async def get(self, endpoint_id: str) -> dict[str, str]:
        return dict(self._s.inflight.get(endpoint_id, {}))

    async def task(self, endpoint_id: str, task_id: str) -> str | None:
        return self._s.inflight.get(endpoint_id, {}).get(task_id)

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
