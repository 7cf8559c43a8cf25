"""The health check (farcall.broker.health): ok while Redis, RabbitMQ and the blob store answer,
503 naming the one that does not. The route: tests/broker/routes/test_health.py."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from farcall.broker import health
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.store.redis import RedisStore
from harness.procs import free_port
from harness.services import AMQP_URL, REDIS_URL

pytestmark = pytest.mark.anyio


ALL_OK = {"store": "ok", "queue": "ok", "blobs": "ok"}


def settings_on(prefix: str, redis_url: str = REDIS_URL, amqp_url: str = AMQP_URL,
              blob_dir: str = "") -> Settings:
    return Settings(redis_url=redis_url, amqp_url=amqp_url, blob_dir=blob_dir,
                    redis_prefix=f"{prefix}:", queue_prefix=f"{prefix}.")


def closed_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def closed_amqp() -> str:
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
    async for svc in _services(settings_on(real_prefix)):
        status, body = await health.check(svc)
        assert status == 200, body
        assert body.status == "ok" and body.services == ALL_OK
        assert body.broker_id == await svc.store.broker_id()


async def test_the_broker_id_is_said_during_an_outage_once_known(services: None,
                                                                 real_prefix: str) -> None:
    """An endpoint asking which broker this is gets the answer while RabbitMQ is down, and while
    Redis is, once this replica has read it."""
    async for svc in _services(settings_on(real_prefix, amqp_url=closed_amqp())):
        status, body = await health.check(svc)
        assert status == 503 and body.broker_id == await svc.broker_id()
        known, svc.store = svc.store, RedisStore(closed_redis(), f"{real_prefix}:")  # Redis gone
        try:
            status, body = await health.check(svc, timeout=0.5)
            assert status == 503 and body.services["store"].startswith("not answering: ")
            assert body.broker_id == await known.broker_id()
        finally:
            await svc.store.close()
            svc.store = known


async def test_a_blob_directory_gone_is_named(services: None, real_prefix: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    async for svc in _services(settings_on(real_prefix, blob_dir=str(blobs))):
        status, body = await health.check(svc)
        assert status == 200 and body.services == ALL_OK, body
        shutil.rmtree(blobs)  # an unmounted share: uploads would fail
        status, body = await health.check(svc)
        assert status == 503 and body.status == "unavailable"
        assert body.services["store"] == body.services["queue"] == "ok"
        assert body.services["blobs"].startswith("not answering: ") and str(blobs) in body.services["blobs"]


@pytest.mark.parametrize("down", ["store", "queue"])
async def test_names_the_service_that_is_down(services: None, real_prefix: str, down: str) -> None:
    settings = (settings_on(real_prefix, redis_url=closed_redis()) if down == "store"
                else settings_on(real_prefix, amqp_url=closed_amqp()))
    async for svc in _services(settings):
        status, body = await health.check(svc)
        assert status == 503 and body.status == "unavailable"
        assert body.services["queue" if down == "store" else "store"] == "ok"
        assert body.services[down].startswith("not answering: "), body.services


async def test_a_silent_service_is_down_in_time(services: None, real_prefix: str,
                                                silent_port: int) -> None:
    svc = Services.build(settings_on(real_prefix, redis_url=f"redis://127.0.0.1:{silent_port}/0"))
    status, body = await health.check(svc, timeout=0.5)  # not started: start() would wait too
    assert status == 503
    assert body.services["store"] == "not answering: no answer within 0.5 s"
    await svc.close()
