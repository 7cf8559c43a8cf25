"""``Requeuer``: every replica's sweep of batches recorded as waiting but never queued.

``submission.submit_batch`` records a batch (``TaskStore.create``, which keeps it among the
store's ``unqueued`` batches) and then queues it; a broker killed in between, or a queue that
was down, leaves it there. Every ``FARCALL_REQUEUE_AFTER`` / 2 each replica claims the batches
waiting longer than ``FARCALL_REQUEUE_AFTER`` (a claim goes to one replica) and queues them.
Tasks that have ended, or that an endpoint session holds already (the first publish got through
before the broker died), are left out, so a task is not sent twice to an endpoint that is
online; a batch whose endpoint was deleted fails its tasks, saying so.
"""

from __future__ import annotations

import logging

from farcall.broker.periodic import Periodic
from farcall.broker.queue.base import QueueMissing
from farcall.broker.queued import read_queued
from farcall.broker.results import publish_results
from farcall.broker.services import Services
from farcall.broker.store.base import UnqueuedBatch
from farcall.protocol.channel import join_task_batch
from farcall.protocol.common import now

log = logging.getLogger(__name__)

BATCH = 100
"""Batches claimed per sweep; with more waiting, the next sweep follows at once."""
DELETED = "the task's endpoint was deleted before it could be queued"


class Requeuer(Periodic):
    name = "requeue"

    def __init__(self, svc: Services, batch: int = BATCH) -> None:
        super().__init__(svc.settings.requeue_after / 2, log)
        self.svc, self.batch = svc, batch

    async def step(self, at: float) -> bool:
        return await self.sweep(at) >= self.batch

    async def sweep(self, at: float) -> int:
        """Queue the batches recorded more than ``FARCALL_REQUEUE_AFTER`` before ``at`` and
        never queued; how many were claimed. A batch whose queueing fails again stays claimed
        for the next sweep after the same wait."""
        claimed = await self.svc.store.unqueued.claim(
            at - self.svc.settings.requeue_after, at, self.batch)
        for batch in claimed:
            if self.stopping:
                break
            await self._queue(batch)
        return len(claimed)

    async def _queue(self, batch: UnqueuedBatch) -> None:
        svc = self.svc
        tasks, unreadable = read_queued(batch.body)
        records = await svc.store.tasks.summaries([t.task_id for t in tasks])
        held = await svc.store.inflight.get(batch.endpoint_id) if tasks else {}
        waiting = [t for t, rec in zip(tasks, records, strict=True)
                   if rec is not None and not rec.state.terminal and t.task_id not in held]
        for task_id, error in unreadable.items():
            await publish_results(svc, await svc.store.tasks.fail([task_id], error, now()))
        if waiting:
            body = batch.body if len(waiting) == len(tasks) and not unreadable else \
                join_task_batch([t.model_dump_json() for t in waiting])
            try:
                await svc.queue.publish(batch.endpoint_id, [body])
            except QueueMissing:
                failed = await svc.store.tasks.fail([t.task_id for t in waiting], DELETED, now())
                await publish_results(svc, failed)
        await svc.store.unqueued.done([batch.batch_id])
        log.info("endpoint %s: queued %d tasks of a batch recorded but never queued (%d had "
                 "ended or were taken)", batch.endpoint_id, len(waiting),
                 len(tasks) - len(waiting))
