"""Fixtures for the broker's unit tests: queues and whole brokers on memory and on the real services
(the store's are in ``store/conftest.py``).

The real Redis and RabbitMQ are started when they do not answer (the ``services``
fixture), and a test fails, never skips, when they cannot be. Every test uses
its own Redis key prefix and RabbitMQ queue prefix and removes what it made.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.queue.rabbitmq import RabbitQueue
from farcall.broker.settings import Settings
from harness.services import AMQP_URL, REDIS_URL, drop_service_data
from tests.broker.helpers import Queues, drop_queues


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def real_prefix() -> str:
    return f"farcall-test-{uuid.uuid4().hex}"


@pytest.fixture(params=["memory", "rabbitmq"])
async def queues(request: pytest.FixtureRequest, real_prefix: str) -> AsyncIterator[Queues]:
    if request.param == "memory":
        yield Queues(MemoryQueue(f"{real_prefix}."))
        return
    request.getfixturevalue("services")
    q = RabbitQueue(AMQP_URL, f"{real_prefix}.")
    await q.start()
    qs = Queues(q)
    try:
        yield qs
    finally:
        await q.close()
        drop_queues(q, qs.used)


@pytest.fixture(params=["memory", "real"])
def broker_settings(request: pytest.FixtureRequest, real_prefix: str) -> Iterator[Settings]:
    """Settings for a whole broker: embedded, or on the real Redis and RabbitMQ."""
    if request.param == "memory":
        yield Settings()
        return
    request.getfixturevalue("services")
    yield Settings(
        redis_url=REDIS_URL,
        amqp_url=AMQP_URL,
        redis_prefix=f"{real_prefix}:",
        queue_prefix=f"{real_prefix}.",
    )
    drop_service_data(f"{real_prefix}:", f"{real_prefix}.")
