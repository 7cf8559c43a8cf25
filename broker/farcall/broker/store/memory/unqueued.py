"""In-process ``UnqueuedStore``: batches recorded as waiting, not yet confirmed by the queue."""

from __future__ import annotations

from farcall.broker.store.base import UnqueuedBatch, UnqueuedStore
from farcall.broker.store.memory.state import State


class MemoryUnqueued(UnqueuedStore):
    def __init__(self, state: State) -> None:
        self._s = state

    async def done(self, batch_ids: list[str]) -> None:
        for batch_id in batch_ids:
            self._s.unqueued.pop(batch_id, None)

    async def claim(self, recorded_before: float, at: float, limit: int) -> list[UnqueuedBatch]:
        waiting = self._s.unqueued
        stale = sorted((since, batch_id) for batch_id, (since, _) in waiting.items()
                       if since < recorded_before)[:limit]
        claimed = []
        for _, batch_id in stale:
            batch = waiting[batch_id][1]
            waiting[batch_id] = (at, batch)
            claimed.append(batch)
        return claimed
