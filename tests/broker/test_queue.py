"""The queue contract, run against the in-process queue and the real RabbitMQ; and RabbitQueue
across a restart of a RabbitMQ node of the module's own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from farcall.broker.errors import Unavailable
from farcall.broker.queue.base import Consumer, Delivery, QueueMissing
from farcall.broker.queue.rabbitmq import CONNECT_TIMEOUT, OP_TIMEOUT, RabbitQueue
from harness.private_services import PrivateRabbit
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
    await q.declare(eid)
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
    await q.declare(eid)
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
    await q.declare(eid)
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
    await q.declare(eid)
    await q.publish(eid, [b"x"] * 5)
    await _depth_becomes(queues, eid, 5)
    await q.delete(eid)
    await q.declare(eid)
    assert await q.depth(eid) == 0


async def test_drain_takes_waiting_bodies_in_order(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    assert await q.drain(eid) == [], "a queue that does not exist drains to nothing"
    await q.declare(eid)
    bodies = [f"task-{i}".encode() for i in range(30)]
    await q.publish(eid, bodies[:10])
    await q.publish(eid, bodies[10:])
    await _depth_becomes(queues, eid, 30)
    assert await q.drain(eid) == bodies
    await _depth_becomes(queues, eid, 0)
    assert await q.drain(eid) == []
    await q.publish(eid, [b"later"])
    consumer = await q.consume(eid, prefetch=10)
    assert [d.body for d in await _take(consumer, 1)] == [b"later"], "the queue still works"
    await consumer.close()


async def test_drain_leaves_deliveries_a_consumer_holds(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    await q.declare(eid)
    await q.publish(eid, [b"held"])
    consumer = await q.consume(eid, prefetch=1)
    held = await _take(consumer, 1)
    await q.publish(eid, [b"waiting"])
    await _depth_becomes(queues, eid, 1)
    assert await q.drain(eid) == [b"waiting"]
    await consumer.ack(held)
    await consumer.close()
    await _depth_becomes(queues, eid, 0)


async def test_publish_to_a_missing_queue_raises(queues: Queues) -> None:
    q, eid = queues.queue, queues.endpoint()
    with pytest.raises(QueueMissing):
        await q.publish(eid, [b"never declared"])
    await q.declare(eid)
    await q.publish(eid, [b"kept"])
    await q.delete(eid)
    with pytest.raises(QueueMissing, match="no queue") as caught:
        await q.publish(eid, [b"a", b"b"])
    assert isinstance(caught.value, Unavailable), "an unhandled QueueMissing answers 503"
    assert await q.depth(eid) == 0, "neither publish nor depth made the queue again"
    await q.declare(eid)
    await q.publish(eid, [b"again"])
    await _depth_becomes(queues, eid, 1)


async def test_ping(queues: Queues) -> None:
    await queues.queue.ping()


# ---- RabbitMQ restarts, on a node of this module's own


@pytest.fixture(scope="module")
def rabbit(services: None) -> Iterator[PrivateRabbit]:
    node = PrivateRabbit().start()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
async def private_queue(rabbit: PrivateRabbit) -> AsyncIterator[RabbitQueue]:
    q = RabbitQueue(rabbit.url, f"farcall-test-{uuid.uuid4().hex}.")
    await q.start()
    try:
        yield q
    finally:
        await q.close()


BOUND = CONNECT_TIMEOUT + OP_TIMEOUT
"""No queue call may take longer than this while RabbitMQ is down: it fails, it never hangs."""


async def test_rabbit_queue_recovers_from_a_restart(
    rabbit: PrivateRabbit, private_queue: RabbitQueue
) -> None:
    q = private_queue
    waiting, held = uuid.uuid4().hex, uuid.uuid4().hex
    for eid in (waiting, held):
        await q.declare(eid)
    await q.publish(waiting, [b"before"])
    await q.publish(held, [b"taken"])
    consumer = await q.consume(held, prefetch=10)
    assert [d.body for d in await _take(consumer, 1)] == [b"taken"]

    late = RabbitQueue(rabbit.url, q.prefix)  # a broker replica starting while RabbitMQ is down
    await asyncio.to_thread(rabbit.stop_app)
    try:
        async with asyncio.timeout(BOUND):
            with pytest.raises(Unavailable):
                await consumer.get_batch(10, timeout=BOUND)
        async with asyncio.timeout(BOUND):
            with pytest.raises(Unavailable, match="not answering"):
                await late.start()
        for call in (lambda: q.publish(waiting, [b"during"]), q.ping, lambda: q.depth(waiting),
                     lambda: q.drain(waiting), lambda: q.consume(waiting, 10)):
            async with asyncio.timeout(BOUND):
                with pytest.raises(Unavailable):
                    await call()
        await consumer.close()
    finally:
        await asyncio.to_thread(rabbit.start_app)

    await q.ping()
    await q.publish(waiting, [b"after"])
    assert await q.drain(waiting) == [b"before", b"after"], "the durable message outlived the restart"
    assert await q.drain(held) == [b"taken"], "the unacked delivery went back to its queue"
    again = await q.consume(held, prefetch=10)
    await q.publish(held, [b"new"])
    got = await _take(again, 1)
    assert [d.body for d in got] == [b"new"]
    await again.ack(got)
    await again.close()
    await late.publish(waiting, [b"from the late replica"])
    assert await q.drain(waiting) == [b"from the late replica"]
    await late.close()
    for eid in (waiting, held):
        await q.delete(eid)

