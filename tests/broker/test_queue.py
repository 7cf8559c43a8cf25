"""The queue contract, run against the in-process queue and the real RabbitMQ."""

from __future__ import annotations

import asyncio
import time

import pytest

from farcall.broker.queue.base import Consumer, Delivery
from tests.broker.helpers import Queues

pytestmark = pytest.mark.anyio


async def _depth_becomes(queues: Queues, eid: str, n: int, timeout: float = 10) -> None:
    """RabbitMQ reports depth asynchronously to acks/requeues; wait for it with a deadline."""
    deadline = time.monotonic() + timeout
    while (depth := await queues.queue.depth(eid)) != n:
        assert time.monotonic() < deadline, f"queue depth stayed {depth}, expected {n}"
        await asyncio.sleep(0.05)


async def _take(consumer: Consumer, n: int, timeout: float = 10) -> list[Delivery]:
    """Take exactly n deliveries (they may arrive over several batches)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(got)} deliveries, expected {n}"
        got += await consumer.get_batch(n - len(got), timeout=left)
    return got


async def test_publish_consume_in_order_and_ack(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    await q.declare(eid)
    assert await q.depth(eid) == 0
    bodies = [f"task-{i}".encode() for i in range(50)]
    await q.publish(eid, bodies)
    await _depth_becomes(queues, eid, 50)
    consumer = await q.consume(eid, prefetch=100)
    got = await _take(consumer, 50)
    assert [d.body for d in got] == bodies
    await consumer.ack(got)
    await consumer.close()
    await _depth_becomes(queues, eid, 0)


async def test_get_batch_respects_max_and_times_out_empty(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    await q.publish(eid, [b"a", b"b", b"c"])
    consumer = await q.consume(eid, prefetch=10)
    first = await _take(consumer, 2)
    assert [d.body for d in first] == [b"a", b"b"]
    rest = await _take(consumer, 1)
    assert [d.body for d in rest] == [b"c"]
    await consumer.ack(first + rest)
    assert await consumer.get_batch(10, timeout=0.1) == []
    await consumer.close()


async def test_close_requeues_unacked(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    await q.publish(eid, [b"1", b"2", b"3", b"4"])
    consumer = await q.consume(eid, prefetch=10)
    got = await _take(consumer, 4)
    await consumer.ack(got[:2])
    await consumer.close()
    await _depth_becomes(queues, eid, 2)
    again = await q.consume(eid, prefetch=10)
    redelivered = await _take(again, 2)
    assert sorted(d.body for d in redelivered) == [b"3", b"4"]
    await again.ack(redelivered)
    await again.close()


async def test_prefetch_limits_unacked(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    await q.publish(eid, [str(i).encode() for i in range(10)])
    consumer = await q.consume(eid, prefetch=3)
    got = await _take(consumer, 3)
    assert await consumer.get_batch(10, timeout=0.3) == []
    await consumer.ack(got)
    more = await _take(consumer, 3)
    assert [d.body for d in more] == [b"3", b"4", b"5"]
    await consumer.ack(more)
    await consumer.close()
    await _depth_becomes(queues, eid, 4)


async def test_messages_wait_for_a_consumer_and_delete(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    await q.publish(eid, [b"x"] * 5)
    await _depth_becomes(queues, eid, 5)
    await q.delete(eid)
    await q.declare(eid)
    assert await q.depth(eid) == 0
