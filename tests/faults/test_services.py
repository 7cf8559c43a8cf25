"""Restarts of the broker's backing services mid-run: Redis (with AOF) and RabbitMQ.

Each runs on a service of its own (``harness.private_services``), so the
restart touches nothing else on the machine. The broker must reconnect by
itself; no process of farcall is restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.faults import run_scenario
from harness.private_services import PrivateRabbit, PrivateRedis
from tests.faults.helpers import Deployment, agent_sessions

pytestmark = pytest.mark.integration


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    with PrivateRabbit() as rabbit:
        yield rabbit


def test_redis_restart(private_redis: PrivateRedis, deployment: Callable[..., Deployment],
                       tmp_path: Path) -> None:
    dep = deployment(redis_url=private_redis.url, name="redis-restart").start()
    ep = dep.endpoint("redis-restart")
    eid = dep.start_endpoint(ep)

    report = run_scenario("Redis restart (AOF)", dep.broker.url, dep.token, eid, private_redis.restart,
                          tmp_path, extra=lambda: {"agent_sessions": agent_sessions(ep)})
    report.assert_ok()


def test_rabbitmq_restart(private_rabbit: PrivateRabbit, deployment: Callable[..., Deployment],
                          tmp_path: Path) -> None:
    dep = deployment(amqp_url=private_rabbit.url, name="rabbitmq-restart").start()
    ep = dep.endpoint("rabbitmq-restart")
    eid = dep.start_endpoint(ep)

    report = run_scenario("RabbitMQ restart", dep.broker.url, dep.token, eid, private_rabbit.restart,
                          tmp_path, extra=lambda: {"agent_sessions": agent_sessions(ep)})
    report.assert_ok()
