"""``/v1/health`` (farcall.broker.health): 200 while Redis and RabbitMQ answer, 503 naming the one
that does not."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi.testclient import TestClient

from farcall.broker import health
from farcall.broker.app import create_app
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from harness.procs import free_port
from harness.services import AMQP_URL, REDIS_URL

pytestmark = pytest.mark.anyio


def _settings(prefix: str, redis_url: str = REDIS_URL, amqp_url: str = AMQP_URL) -> Settings:
    return Settings(redis_url=redis_url, amqp_url=amqp_url,
                    redis_prefix=f"{prefix}:", queue_prefix=f"{prefix}.")


def _closed_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def _closed_amqp() -> str:
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


async def _services(settings: Settings) -> AsyncIterator[Services]:
    svc = Services.build(settings)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


async def test_ok_when_both_answer(services: None, real_prefix: str) -> None:
    async for svc in _services(_settings(real_prefix)):
        status, body = await health.check(svc)
        assert status == 200, body
        assert body.status == "ok" and body.services == {"store": "ok", "queue": "ok"}


@pytest.mark.parametrize("down", ["store", "queue"])
async def test_names_the_service_that_is_down(services: None, real_prefix: str, down: str) -> None:
    settings = (_settings(real_prefix, redis_url=_closed_redis()) if down == "store"
                else _settings(real_prefix, amqp_url=_closed_amqp()))
    async for svc in _services(settings):
        status, body = await health.check(svc)
        assert status == 503 and body.status == "unavailable"
        up = {"store", "queue"} - {down}
        assert body.services[up.pop()] == "ok"
        assert body.services[down].startswith("not answering: "), body.services


async def test_a_silent_service_is_down_in_time(services: None, real_prefix: str,
                                                silent_port: int) -> None:
    svc = Services.build(_settings(real_prefix, redis_url=f"redis://127.0.0.1:{silent_port}/0"))
    status, body = await health.check(svc, timeout=0.5)  # not started: start() would wait too
    assert status == 503
    assert body.services["store"] == "not answering: no answer within 0.5 s"
    await svc.close()


def test_route_answers_200_with_real_services(services: None, real_prefix: str) -> None:
    with TestClient(create_app(_settings(real_prefix))) as client:
        r = client.get("/v1/health")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    assert r.json()["services"] == {"store": "ok", "queue": "ok"}


def test_route_answers_503_when_redis_and_rabbitmq_are_closed(real_prefix: str) -> None:
    app = create_app(_settings(real_prefix, redis_url=_closed_redis(), amqp_url=_closed_amqp()))
    with TestClient(app) as client:
        r = client.get("/v1/health")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "unavailable"
    assert set(body["services"]) == {"store", "queue"}
    assert all(v.startswith("not answering: ") for v in body["services"].values()), body
