"""The shared Redis and RabbitMQ on loopback: checking they answer, starting them, removing a run's data.

A run owns every Redis key under its prefix and every RabbitMQ queue and
exchange under its queue prefix; nothing else is touched, so a concurrent test
run or benchmark keeps its data.
"""

from __future__ import annotations

import socket
import subprocess

from harness import REPO

REDIS_PORT = 6379
AMQP_PORT = 5672
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
AMQP_URL = f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}/"


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def ensure_services() -> None:
    """Make Redis and RabbitMQ answer on loopback: start them, or install them with apt-get and start
    them (``scripts/ensure_services.sh``). Raises ``RuntimeError`` naming the one that still does not."""
    if not (answers(REDIS_PORT) and answers(AMQP_PORT)):
        subprocess.run([str(REPO / "scripts" / "ensure_services.sh")], check=True)
    for name, port in (("Redis", REDIS_PORT), ("RabbitMQ", AMQP_PORT)):
        if not answers(port):
            raise RuntimeError(f"{name} does not answer on 127.0.0.1:{port}; "
                               "start it with scripts/ensure_services.sh")


def redis_keys(prefix: str) -> int:
    """How many Redis keys there are under ``prefix``."""
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


def rabbitmq_queues(prefix: str) -> dict[str, int]:
    """Queues whose name starts with ``prefix``, with their message counts."""
    found = {}
    for line in _rabbitmqctl("list_queues", "name", "messages"):
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(prefix) and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


def rabbitmq_exchanges(prefix: str) -> list[str]:
    return [line.split()[0] for line in _rabbitmqctl("list_exchanges", "name")
            if line.strip() and line.split()[0].startswith(prefix)]


def drop_rabbitmq_queues(names: list[str], exchanges: list[str] | None = None) -> None:
    """Delete RabbitMQ queues (and exchanges) by name."""
    import pika

    if not names and not exchanges:
        return
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = conn.channel()
        for name in names:
            channel.queue_delete(name)
        for name in exchanges or []:
            channel.exchange_delete(name)
    finally:
        conn.close()


def drop_rabbitmq_prefix(prefix: str) -> list[str]:
    """Delete the queues and exchanges named with ``prefix``; their names."""
    if not prefix:
        raise ValueError("refusing to delete RabbitMQ queues without a prefix")
    names = list(rabbitmq_queues(prefix))
    exchanges = rabbitmq_exchanges(prefix)
    drop_rabbitmq_queues(names, exchanges)
    return names + exchanges


def drop_service_data(redis_prefix: str, queue_prefix: str) -> None:
    """Remove what a run made in Redis and RabbitMQ."""
    drop_redis_prefix(redis_prefix)
    drop_rabbitmq_prefix(queue_prefix)
