"""An embedded broker (in-process store and queue) and a thread-pool endpoint, shared by SDK tests,
and a broker faked at the SDK's seams (``fake``) for tests that script the broker's answers.

The SDK's behaviour against real Redis and RabbitMQ is in tests/integration.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import farcall.executor
from farcall import Client
from farcall.broker.embedded import EmbeddedBroker
from farcall.endpoint.embedded import EmbeddedEndpoint
from tests.sdk.fake_broker import FakeBroker
from tests.sdk.helpers import Stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with EmbeddedBroker() as broker:
        token = broker.create_user("sdk-tests")
        with EmbeddedEndpoint(broker.url, token, engine="ThreadPoolEngine", max_workers=4) as ep:
            assert ep.endpoint_id
            yield Stack(broker, token, ep.endpoint_id)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    c = stack.client()
    yield c
    c.close()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    """A fake broker; Executors made in the test use its result stream."""
    broker = FakeBroker()
    monkeypatch.setattr(farcall.executor, "TaskGroupStream", broker.stream)
    return broker
