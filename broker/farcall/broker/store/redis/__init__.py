"""Redis store: every key under one prefix, batches in one pipeline or one Lua call.

One module per part, each naming the keys it keeps: ``users``, ``functions``, ``endpoints``,
``tasks``, ``inflight``, ``unqueued``, ``pubsub``, ``actions``, ``timers``; ``blobs`` is the Redis
``BlobStore``, chosen apart from the records' backend. The parts share one command connection
and key prefix (``connection``); each registers the Lua scripts it runs, kept beside it, and
``scripts`` holds the Lua more than one part runs. State changes that must not go backwards
(running after success, a second result) are Lua scripts, so they are atomic across broker
replicas. The store itself keeps one key, ``p broker-id``: the deployment's identity (``SET NX``).
"""

from __future__ import annotations

import uuid

from farcall.broker.store.base import Store
from farcall.broker.store.redis.actions import RedisActions
from farcall.broker.store.redis.connection import RedisConnection
from farcall.broker.store.redis.endpoints import RedisEndpoints
from farcall.broker.store.redis.functions import RedisFunctions
from farcall.broker.store.redis.inflight import RedisInflight
from farcall.broker.store.redis.pubsub import RedisPubSub
from farcall.broker.store.redis.tasks import RedisTasks
from farcall.broker.store.redis.timers import RedisTimers
from farcall.broker.store.redis.unqueued import RedisUnqueued
from farcall.broker.store.redis.users import RedisUsers

__all__ = ["RedisStore"]


class RedisStore(Store):
    def __init__(self, url: str, prefix: str = "farcall:", result_ttl: int = 7 * 24 * 3600) -> None:
        self.db = RedisConnection(url, prefix, result_ttl)
        self.users = RedisUsers(self.db)
        self.functions = RedisFunctions(self.db)
        self.endpoints = RedisEndpoints(self.db)
        self.tasks = RedisTasks(self.db)
        self.inflight = RedisInflight(self.db)
        self.unqueued = RedisUnqueued(self.db)
        self.actions = RedisActions(self.db.r, prefix)
        self.pubsub = RedisPubSub(self.db.r, prefix)
        self.timers = RedisTimers(self.db.r, prefix)

    async def start(self) -> None:
        await self.db.r.ping()

    async def broker_id(self) -> str:
        key = self.db.k("broker-id")
        await self.db.r.set(key, str(uuid.uuid4()), nx=True)  # the first replica to ask makes it
        return str(await self.db.r.get(key))

    async def ping(self) -> None:
        await self.db.r.ping()

    async def close(self) -> None:
        await self.pubsub.close()
        await self.db.r.aclose()
