"""Helpers shared by every test tree: waiting on conditions, free ports, service checks."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




async def drop_redis_keys(prefix: str) -> None:
    """Delete every Redis key under ``prefix`` (a test run's own)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 500):
            await r.delete(*keys[i : i + 500])
    finally:
        await r.aclose()


async def drop_queues(names: list[str]) -> None:
    """Delete RabbitMQ queues by name."""
    import aio_pika

    if not names:
        return
    conn = await aio_pika.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await conn.close()


def queues_named(prefix: str) -> list[str]:
    """Names of the RabbitMQ queues starting with ``prefix`` (via rabbitmqctl)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60
    )
    return [n for n in listed.stdout.split() if n.startswith(prefix)]


def drop_service_data(redis_prefix: str, queue_prefix: str) -> None:
    """Remove what a test run made in Redis and RabbitMQ."""
    asyncio.run(drop_redis_keys(redis_prefix))
    asyncio.run(drop_queues(queues_named(queue_prefix)))
