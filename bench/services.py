"""The shared Redis and RabbitMQ on loopback: checking they answer, and removing a run's data.

A run owns every Redis key under its prefix and every RabbitMQ queue and
exchange under its queue prefix; nothing else is touched, so a concurrent test
run or benchmark keeps its data.
"""

from __future__ import annotations

import logging
import socket
import subprocess

import psutil

from bench.procs import find_service

log = logging.getLogger(__name__)

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
CELERY_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
"""The same vhost ``/`` as ``AMQP_URL``, spelled as kombu wants it."""


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def redis_keys(prefix: str) -> int:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        return sum(1 for _ in r.scan_iter(match=prefix + "*", count=5000))
    finally:
        r.close()


def drop_redis_prefix(prefix: str) -> int:
    """Delete every key under ``prefix``; how many there were."""
    import redis

    if not prefix or prefix in ("*", ":"):
        raise ValueError(f"refusing to delete Redis keys under the prefix {prefix!r}")
    r = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in r.scan_iter(match=prefix + "*", count=5000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(r.unlink(*batch))
                batch = []
        if batch:
            deleted += int(r.unlink(*batch))
    finally:
        r.close()
    return deleted


def _rabbitmqctl(*args: str) -> list[str]:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.splitlines()


def queues(prefix: str) -> dict[str, int]:
    """Queues whose name starts with ``prefix``, with their message counts."""
    found = {}
    for line in _rabbitmqctl("list_queues", "name", "messages"):
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(prefix) and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


def exchanges(prefix: str) -> list[str]:
    return [line.split()[0] for line in _rabbitmqctl("list_exchanges", "name")
            if line.strip() and line.split()[0].startswith(prefix)]


def drop_rabbitmq_prefix(prefix: str) -> list[str]:
    """Delete the queues and exchanges named with ``prefix``; their names."""
    import pika

    if not prefix:
        raise ValueError("refusing to delete RabbitMQ queues without a prefix")
    names = list(queues(prefix))
    xnames = exchanges(prefix)
    if not names and not xnames:
        return []
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = conn.channel()
        for name in names:
            channel.queue_delete(name)
        for name in xnames:
            channel.exchange_delete(name)
    finally:
        conn.close()
    return names + xnames


def redis_process() -> psutil.Process | None:
    return find_service("redis-server", "6379")


def rabbitmq_process() -> psutil.Process | None:
    return find_service("beam.smp", "rabbit")


def redis_version() -> str:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    try:
        return str(r.info("server").get("redis_version", "?"))
    finally:
        r.close()


def rabbitmq_version() -> str:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        version = conn._impl.server_properties.get("version", b"?")  # noqa: SLF001 - only place pika has it
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        conn.close()
