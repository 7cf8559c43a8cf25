"""Fixtures for the broker's unit tests: stores and queues on memory and on the real services.

The real Redis and RabbitMQ must answer on loopback; when they do not, the tests
fail (never skip) and say how to start them. Every test uses its own Redis key
prefix and RabbitMQ queue prefix and removes what it made.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.queue.rabbitmq import RabbitQueue
from farcall.broker.settings import Settings
from farcall.broker.store.base import Store
from farcall.broker.store.memory import MemoryStore
from farcall.broker.store.redis import RedisStore

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from broker_helpers import (  # noqa: E402 - importable once HERE is on the path
    AMQP_URL,
    REDIS_URL,
    Queues,
    drop_queues,
    drop_redis_keys,
    require_service,
)

from harness import drop_service_data  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def real_prefix() -> str:
    return f"farcall-test-{uuid.uuid4().hex}"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, real_prefix: str) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    require_service("Redis", 6379)
    s = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=3600)
    await s.start()
    try:
        yield s
    finally:
        await s.close()
        await drop_redis_keys(f"{real_prefix}:")


@pytest.fixture(params=["memory", "rabbitmq"])
async def queues(request: pytest.FixtureRequest, real_prefix: str) -> AsyncIterator[Queues]:
    if request.param == "memory":
        yield Queues(MemoryQueue(f"{real_prefix}."))
        return
    require_service("RabbitMQ", 5672)
    q = RabbitQueue(AMQP_URL, f"{real_prefix}.")
    await q.start()
    qs = Queues(q)
    try:
        yield qs
    finally:
        await q.close()
        await drop_queues(f"{real_prefix}.", qs.used)


@pytest.fixture(params=["memory", "real"])
def broker_settings(request: pytest.FixtureRequest, real_prefix: str) -> Iterator[Settings]:
    """Settings for a whole broker: embedded, or on the real Redis and RabbitMQ."""
    if request.param == "memory":
        yield Settings()
        return
    require_service("Redis", 6379)
    require_service("RabbitMQ", 5672)
    yield Settings(
        redis_url=REDIS_URL,
        amqp_url=AMQP_URL,
        redis_prefix=f"{real_prefix}:",
        queue_prefix=f"{real_prefix}.",
    )
    drop_service_data(f"{real_prefix}:", f"{real_prefix}.")
