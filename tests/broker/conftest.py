"""Fixtures for the broker's unit tests: queues and whole brokers on memory and on the real
services, a replica's services on memory, and apps under a test client (the store's fixtures are
in ``store/conftest.py``).

The real Redis and RabbitMQ are started when they do not answer (the ``services``
fixture), and a test fails, never skips, when they cannot be. Every test uses
its own Redis key prefix and RabbitMQ queue prefix and removes what it made.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from farcall.broker.app import create_app
from farcall.broker.queue.base import TaskQueue
from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.queue.rabbitmq import RabbitQueue
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.store.base import Store
from harness.services import AMQP_URL, REDIS_URL, drop_service_data
from tests.broker.helpers import Api, Queues, drop_queues

MakeApi = Callable[..., Api]
"""``make_api(settings=None, *, store=None, queue=None)``: see the ``make_api`` fixture."""


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


@pytest.fixture
def make_api() -> Iterator[MakeApi]:
    """Start broker apps under a ``TestClient`` (stopped after the test).

    ``make_api(settings, store=..., queue=...)``: the store and queue the settings choose
    (memory for ``Settings()``) unless given. With no settings, ``Settings(auth_failure_rate=0)``:
    tests send bad tokens on purpose, many times (the limit on failed authentications has
    tests of its own: tests/broker/test_limits.py, tests/integration/test_limits.py).
    """
    with contextlib.ExitStack() as running:

        def make(settings: Settings | None = None, *, store: Store | None = None,
                 queue: TaskQueue | None = None) -> Api:
            app = create_app(settings or Settings(auth_failure_rate=0), store=store, queue=queue)
            client = running.enter_context(TestClient(app))
            return Api(client, app.state.services)

        yield make


@pytest.fixture
def api(make_api: MakeApi) -> Api:
    """A broker app on a memory store and queue, under a ``TestClient``."""
    return make_api()


@pytest.fixture
async def svc() -> AsyncIterator[Services]:
    """A replica's services on a memory store, queue and blob store, started (no app)."""
    services = Services.build(Settings())
    await services.start()
    try:
        yield services
    finally:
        await services.close()
