"""``UnqueuedStore``: batches ``TaskStore.create`` recorded as queued are kept until ``done``,
claimed once across sweeps, on the in-process store and the real Redis."""

from __future__ import annotations

import pytest

from farcall.broker.store.base import Store
from farcall.protocol.channel import parse_task_batch
from tests.broker.records import new_tasks

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0


async def test_a_queued_batch_is_kept_until_done_and_claimed_once(store: Store) -> None:
    batch = new_tasks(2, at=T0, endpoint="ep1")
    body = b'[{"task_id":"x"}]'
    assert not await store.tasks.create(batch, queued_body=body)
    assert await store.unqueued.claim(T0, T0 + 1, 10) == [], "recorded at T0, not before it"
    (claimed,) = await store.unqueued.claim(T0 + 0.5, T0 + 1, 10)
    assert (claimed.batch_id, claimed.endpoint_id, claimed.body) == (batch.batch_id, "ep1", body)
    assert await store.unqueued.claim(T0 + 0.5, T0 + 1, 10) == [], "a claim restarts its wait"
    assert [b.batch_id for b in await store.unqueued.claim(T0 + 2, T0 + 3, 10)] == [batch.batch_id]
    await store.unqueued.done([batch.batch_id])
    assert await store.unqueued.claim(T0 + 100, T0 + 101, 10) == []


async def test_a_batch_meant_for_a_session_that_is_gone_is_kept_joined(store: Store) -> None:
    """The in-flight bodies become the queue message when the session is not the live one."""
    batch = new_tasks(2, at=T0, endpoint="ep1")
    bodies = {t: f'{{"task_id":"{t}","function_id":"f1","args":"A"}}' for t in batch.task_ids}
    assert not await store.tasks.create(batch, inflight=bodies, session_id="gone")
    (claimed,) = await store.unqueued.claim(T0 + 1, T0 + 2, 10)
    assert [t.task_id for t in parse_task_batch(claimed.body)] == batch.task_ids


async def test_a_batch_that_went_in_flight_is_not_kept(store: Store) -> None:
    await store.endpoints.connect_session("ep1", "s1", None, T0)
    batch = new_tasks(1, at=T0, endpoint="ep1")
    body = {batch.task_ids[0]: f'{{"task_id":"{batch.task_ids[0]}","function_id":"f1","args":"A"}}'}
    assert await store.tasks.create(batch, inflight=body, session_id="s1")
    assert await store.unqueued.claim(T0 + 100, T0 + 101, 10) == []


async def test_claims_are_oldest_first_and_limited(store: Store) -> None:
    batches = [new_tasks(1, at=T0 + i) for i in range(3)]
    for b in batches:
        await store.tasks.create(b, queued_body=b"[]")
    claimed = await store.unqueued.claim(T0 + 10, T0 + 20, 2)
    assert [b.batch_id for b in claimed] == [b.batch_id for b in batches[:2]]
