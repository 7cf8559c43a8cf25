"""Fault tests: real Redis, RabbitMQ, broker and endpoint processes on loopback, a fault mid-run.

Scenarios that break an endpoint or its connection share one broker
(``shared``); a fault on the broker or on its backing services gets a
deployment of its own (``deployment``). Every deployment has its own key and
queue prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.private_services import PrivateRedis
from tests.faults.helpers import Deployment


@pytest.fixture(scope="session")
def _shared_broker(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = Deployment(tmp_path_factory.mktemp("faults-shared"), name="shared").start()
    yield dep
    dep.stop()


@pytest.fixture
def shared(_shared_broker: Deployment) -> Iterator[Deployment]:
    """The broker on the machine's Redis and RabbitMQ that scenarios leaving it alone share.

    Endpoints a test starts on it are stopped when the test ends.
    """
    yield _shared_broker
    _shared_broker.stop_endpoints()


@pytest.fixture
def deployment(services: None, tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    """Make a deployment of this test's own (``Deployment`` arguments); stopped when the test ends."""
    made: list[Deployment] = []

    def make(**kwargs: Any) -> Deployment:
        dep = Deployment(tmp_path, **kwargs)
        made.append(dep)
        return dep

    yield make
    for dep in reversed(made):
        dep.stop()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis server of this test's own, with AOF (so a restart keeps what was written)."""
    with PrivateRedis(appendonly=True) as redis:
        yield redis
