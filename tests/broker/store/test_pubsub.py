"""``PubSub``: frames fanned out on the in-process store and the real Redis; and RedisPubSub on the
real Redis: one pub/sub connection per process however many result streams are open, frames
across replicas, and subscriptions ending when Redis restarts."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis

from farcall.broker.store.base import Store, Subscription
from farcall.broker.store.redis import RedisStore
from farcall.broker.store.redis.pubsub import RedisPubSub
from farcall.protocol.common import TaskState
from farcall.protocol.stream import ResultStreamFrame, TaskResult
from harness.private_services import PrivateRedis
from harness.services import REDIS_URL

pytestmark = pytest.mark.anyio

WAIT = 10.0
"""Bound on every wait for a frame or a state change."""


def _client(url: str = REDIS_URL) -> Any:
    return aioredis.Redis.from_url(url, decode_responses=True)


@pytest.fixture
async def replicas(services: None, real_prefix: str) -> AsyncIterator[tuple[RedisPubSub, RedisPubSub, Any]]:
    """Two replicas' pub/subs on one key prefix (each with its own command client), and the
    first replica's client."""
    r1, r2 = _client(), _client()
    a, b = RedisPubSub(r1, f"{real_prefix}:"), RedisPubSub(r2, f"{real_prefix}:")
    try:
        yield a, b, r1
    finally:
        await a.close()
        await b.close()
        await r1.aclose()
        await r2.aclose()


async def _next(sub: Subscription) -> str:
    async with asyncio.timeout(WAIT):
        return await anext(aiter(sub))


async def _ends(sub: Subscription) -> list[str]:
    """Iterate to the end (bounded); the frames seen on the way."""
    async with asyncio.timeout(WAIT):
        return [frame async for frame in sub]


def _connections_to_redis() -> int:
    """This process's open TCP connections to the machine's Redis (others use it too)."""
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def _pubsub_clients(r: Any, pubsub: RedisPubSub) -> list[dict[str, Any]]:
    return [c for c in await r.client_list() if c.get("name") == pubsub.client_name]


async def _eventually(condition: Any, what: str) -> None:
    """Poll an async condition until it holds, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_many_streams_share_one_connection(replicas: tuple[RedisPubSub, RedisPubSub, Any]) -> None:
    a, b, r = replicas
    groups = [uuid.uuid4().hex for _ in range(200)]
    await r.ping()
    gc.collect()  # a client an earlier test left for the collector would close mid-count
    before = _connections_to_redis()
    subs = await asyncio.gather(*(a.subscribe(g) for g in groups))
    mine = await _pubsub_clients(r, a)
    assert len(mine) == 1 and mine[0]["sub"] == "200", mine
    assert _connections_to_redis() == before + 1, "200 streams hold one connection"

    # REST-style commands on the same client keep working while the streams are open: nearly
    # the whole command pool (100) is still free, all at once.
    key = f"{a._prefix}k"
    await asyncio.gather(*(r.set(f"{key}{i}", i) for i in range(90)))
    assert await r.mget([f"{key}{i}" for i in range(90)]) == [str(i) for i in range(90)]
    await r.delete(*[f"{key}{i}" for i in range(90)])

    for i, g in enumerate(groups):
        await b.publish(g, f"frame {i}")
    assert [await _next(s) for s in subs] == [f"frame {i}" for i in range(200)]
    await asyncio.gather(*(s.close() for s in subs))
    await _eventually(lambda: _sub_count(r, a, "0"), "the channels to be unsubscribed")


async def _sub_count(r: Any, pubsub: RedisPubSub, expected: str) -> bool:
    return [c["sub"] for c in await _pubsub_clients(r, pubsub)] == [expected]


async def test_frames_cross_replicas_and_arrive_once(replicas: tuple[RedisPubSub, RedisPubSub, Any]) -> None:
    a, b, _ = replicas
    group = uuid.uuid4().hex
    on_a, on_b = await a.subscribe(group), await b.subscribe(group)
    await a.publish(group, "one")
    assert await _next(on_a) == "one"
    assert await _next(on_b) == "one"
    await b.publish(group, "two")
    # Had a's own frame come back from Redis too, "one" would be next here.
    assert await _next(on_a) == "two"
    assert await _next(on_b) == "two"
    await on_a.close()
    await on_b.close()
    assert await _ends(on_a) == [] and await _ends(on_b) == []


async def test_last_subscriber_leaving_unsubscribes(replicas: tuple[RedisPubSub, RedisPubSub, Any]) -> None:
    a, b, r = replicas
    group = uuid.uuid4().hex
    channel = a._redis_channel(group)
    first, second = await a.subscribe(group), await a.subscribe(group)
    assert await _sub_count(r, a, "1"), "two local subscribers share one Redis subscription"
    await first.close()
    await b.publish(group, "still here")
    assert await _next(second) == "still here"
    await second.close()
    await _eventually(lambda: _numsub(r, channel, 0), "the channel to be unsubscribed")
    third = await a.subscribe(group)
    await b.publish(group, "again")
    assert await _next(third) == "again"
    await third.close()


async def test_churn_keeps_a_staying_subscriber_fed(replicas: tuple[RedisPubSub, RedisPubSub, Any]) -> None:
    """Streams of one group opening and closing all at once never leave the group unsubscribed
    while someone still listens, and the last one out unsubscribes it."""
    a, b, r = replicas
    group = uuid.uuid4().hex

    async def churn() -> None:
        sub = await a.subscribe(group)
        await sub.close()

    for _ in range(5):
        stays, *_ = await asyncio.gather(a.subscribe(group), *(churn() for _ in range(40)))
        assert isinstance(stays, Subscription)
        await asyncio.gather(*(churn() for _ in range(40)))
        await b.publish(group, "heard")
        assert await _next(stays) == "heard"
        await stays.close()
    await _eventually(lambda: _numsub(r, a._redis_channel(group), 0), "the channel to be unsubscribed")


async def _numsub(r: Any, channel: str, n: int) -> bool:
    return list(await r.pubsub_numsub(channel)) == [(channel, n)]


async def test_close_ends_every_subscription(services: None, real_prefix: str) -> None:
    r = _client()
    pubsub = RedisPubSub(r, f"{real_prefix}:")
    subs = [await pubsub.subscribe(uuid.uuid4().hex) for _ in range(3)]
    await pubsub.close()
    assert [await _ends(s) for s in subs] == [[], [], []]
    assert await _pubsub_clients(r, pubsub) == []
    await r.aclose()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    with PrivateRedis(appendonly=False) as server:
        yield server


async def test_redis_restart_ends_streams_and_subscribe_reconnects(private_redis: PrivateRedis) -> None:
    r = _client(private_redis.url)
    other = _client(private_redis.url)
    a, b = RedisPubSub(r, "t:"), RedisPubSub(other, "t:")
    groups = [uuid.uuid4().hex for _ in range(5)]
    subs = [await a.subscribe(g) for g in groups]
    await asyncio.to_thread(private_redis.restart)
    assert [await _ends(s) for s in subs] == [[]] * 5, "every open stream ended"

    sub = await a.subscribe(groups[0])
    # The publisher's pooled connection died with the server; its first command may fail once.
    await _eventually(lambda: _answers(other), "the publisher's client to reconnect")
    await b.publish(groups[0], "after the restart")
    assert await _next(sub) == "after the restart"
    assert len(await _pubsub_clients(r, a)) == 1
    await sub.close()
    await a.close()
    await b.close()
    await r.aclose()
    await other.aclose()


async def _answers(r: Any) -> bool:
    try:
        return bool(await r.ping())
    except aioredis.ConnectionError:
        return False


async def test_subscribe_while_redis_is_down_is_unavailable(services: None) -> None:
    from farcall.broker.errors import Unavailable
    from harness.procs import free_port

    r = _client(f"redis://127.0.0.1:{free_port()}/0")
    pubsub = RedisPubSub(r, "t:")
    async with asyncio.timeout(WAIT):
        with pytest.raises(Unavailable, match="not answering"):
            await pubsub.subscribe("g")
    assert pubsub._subscribers == {}, "the failed subscription left nothing behind"
    await r.aclose()


async def test_result_fanout(store: Store) -> None:
    sub_a = await store.pubsub.subscribe("g1")
    sub_b = await store.pubsub.subscribe("g1")
    other = await store.pubsub.subscribe("g2")
    frame = ResultStreamFrame(
        results=[TaskResult(task_id="t", state=TaskState.SUCCESS)]
    ).model_dump_json()
    await store.pubsub.publish("g1", frame)

    async def first(sub: Subscription) -> str:
        async for f in sub:
            return f
        return ""

    assert await asyncio.wait_for(first(sub_a), 5) == frame
    assert await asyncio.wait_for(first(sub_b), 5) == frame
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first(other), 0.2)
    for s in (sub_a, sub_b, other):
        await s.close()


@pytest.mark.usefixtures("services")
async def test_each_frame_reaches_a_subscriber_once_from_any_replica(real_prefix: str) -> None:
    """Frames of this replica are handed over directly and not again through Redis."""
    here = RedisStore(REDIS_URL, prefix=f"{real_prefix}:")
    there = RedisStore(REDIS_URL, prefix=f"{real_prefix}:")
    sub = await here.pubsub.subscribe("g")
    try:
        await here.pubsub.publish("g", "one")
        await here.pubsub.publish("g", "two")
        await there.pubsub.publish("g", "last")  # through Redis, after any echo of the two above

        async def until_last() -> list[str]:
            got = []
            async for frame in sub:
                got.append(frame)
                if frame == "last":
                    return got
            return got

        assert await asyncio.wait_for(until_last(), 5) == ["one", "two", "last"]
    finally:
        await sub.close()
        await here.close()
        await there.close()
