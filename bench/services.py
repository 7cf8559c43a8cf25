"""The benchmark's view of the shared Redis and RabbitMQ: their processes and versions.

Checking they answer and removing a run's data is :mod:`harness.services`,
shared with the tests.
"""

from __future__ import annotations

import psutil

from bench.procs import find_service
from harness.services import AMQP_URL, REDIS_URL

CELERY_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
"""The same vhost ``/`` as ``AMQP_URL``, spelled as kombu wants it."""


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
