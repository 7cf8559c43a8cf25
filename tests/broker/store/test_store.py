"""What a store keeps itself rather than in one of its parts: the broker's identity."""

from __future__ import annotations

import uuid

import pytest

from farcall.broker.store.base import Store
from farcall.broker.store.memory import MemoryStore
from farcall.broker.store.redis import RedisStore
from harness.services import REDIS_URL, drop_redis_prefix

pytestmark = pytest.mark.anyio


async def test_the_broker_id_never_changes(store: Store) -> None:
    first = await store.broker_id()
    assert uuid.UUID(first) and await store.broker_id() == first


async def test_replicas_on_one_redis_share_the_broker_id_and_another_prefix_differs(
    services: None, real_prefix: str
) -> None:
    """Replicas of one deployment (one prefix) are one broker; another deployment is another."""
    other = f"{real_prefix}-other:"
    stores = [RedisStore(REDIS_URL, f"{real_prefix}:") for _ in range(2)]
    stores.append(RedisStore(REDIS_URL, other))
    try:
        a, b, c = [await s.broker_id() for s in stores]
        assert a == b != c
    finally:
        for s in stores:
            await s.close()
        drop_redis_prefix(f"{real_prefix}:")
        drop_redis_prefix(other)


async def test_each_in_process_store_is_a_broker_of_its_own() -> None:
    assert await MemoryStore().broker_id() != await MemoryStore().broker_id()
