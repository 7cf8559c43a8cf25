"""The requeue sweep (farcall.broker.requeue) on a memory store and queue: a batch recorded and
never queued is queued after ``requeue_after``, once, without the tasks that ended or that a
session holds; a batch for a deleted endpoint fails. The same against real processes, Redis and
RabbitMQ, with the broker killed between recording and queueing: tests/faults/test_windows.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from farcall.broker.errors import Unavailable
from farcall.broker.requeue import DELETED, Requeuer
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.submission import submit_batch
from farcall.protocol.channel import parse_task_batch
from farcall.protocol.common import TaskState, now
from tests.broker.helpers import batch, endpoint_and_function

pytestmark = pytest.mark.anyio

ALICE = "alice-id"
AFTER = 10.0


@pytest.fixture
async def svc() -> AsyncIterator[Services]:
    services = Services.build(Settings(requeue_after=AFTER))
    await services.start()
    try:
        yield services
    finally:
        await services.close()


async def unqueued_submission(svc: Services, n: int, monkeypatch: pytest.MonkeyPatch
                              ) -> tuple[str, list[str]]:
    """Submit ``n`` tasks while the queue refuses them; the endpoint and the task ids."""
    eid, fid = await endpoint_and_function(svc, ALICE)
    real = svc.queue.publish

    async def refuse(endpoint_id: str, bodies: list[bytes]) -> None:
        raise Unavailable("RabbitMQ is not answering")

    monkeypatch.setattr(svc.queue, "publish", refuse)
    answer = await submit_batch(svc, ALICE, batch(eid, fid, n))
    monkeypatch.setattr(svc.queue, "publish", real)
    return eid, answer.task_ids


async def queued(svc: Services, endpoint_id: str) -> list[str]:
    return [t.task_id for body in await svc.queue.drain(endpoint_id)
            for t in parse_task_batch(body)]


async def test_a_batch_never_queued_is_queued_once_after_the_wait(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid, ids = await unqueued_submission(svc, 3, monkeypatch)
    sweep = Requeuer(svc)
    assert await sweep.sweep(now()) == 0, "not before requeue_after"
    assert await queued(svc, eid) == []
    assert await sweep.sweep(now() + AFTER + 1) == 1
    assert await queued(svc, eid) == ids
    assert await Requeuer(svc).sweep(now() + 3 * AFTER) == 0, "queued once"


async def test_tasks_that_ended_or_are_held_are_left_out(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid, ids = await unqueued_submission(svc, 3, monkeypatch)
    await svc.store.tasks.cancel(ALICE, ids[:1], only_queued=True, at=now())
    await svc.store.endpoints.connect_session(eid, "s1", None, now())
    assert await svc.store.inflight.add(eid, "s1", {ids[1]: "{}"}, 1) == [ids[1]]
    await Requeuer(svc).sweep(now() + AFTER + 1)
    assert await queued(svc, eid) == ids[2:]


async def test_a_batch_whose_endpoint_was_deleted_fails(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid, ids = await unqueued_submission(svc, 2, monkeypatch)
    await svc.queue.delete(eid)
    await Requeuer(svc).sweep(now() + AFTER + 1)
    records = await svc.store.tasks.get_many(ids)
    assert all(r is not None and r.state == TaskState.FAILED and r.error == DELETED
               for r in records)
    assert await Requeuer(svc).sweep(now() + 3 * AFTER) == 0


async def test_a_batch_the_queue_still_refuses_is_tried_again_later(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid, ids = await unqueued_submission(svc, 1, monkeypatch)
    real = svc.queue.publish

    async def refuse(endpoint_id: str, bodies: list[bytes]) -> None:
        raise Unavailable("still down")

    monkeypatch.setattr(svc.queue, "publish", refuse)
    t = now() + AFTER + 1
    with pytest.raises(Unavailable):
        await Requeuer(svc).sweep(t)
    monkeypatch.setattr(svc.queue, "publish", real)
    assert await Requeuer(svc).sweep(t + 1) == 0, "claimed at t: it waits again"
    assert await Requeuer(svc).sweep(t + AFTER + 1) == 1
    assert await queued(svc, eid) == ids
