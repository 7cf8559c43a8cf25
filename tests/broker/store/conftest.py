"""The ``store`` fixture: each store test runs on the in-process store and on the real Redis
(under the test's own key prefix, removed afterwards)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from farcall.broker.store.base import Store
from farcall.broker.store.memory import MemoryStore
from farcall.broker.store.redis import RedisStore
from harness.services import REDIS_URL, drop_redis_prefix


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, real_prefix: str) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    request.getfixturevalue("services")
    s = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=3600)
    await s.start()
    try:
        yield s
    finally:
        await s.close()
        drop_redis_prefix(f"{real_prefix}:")
