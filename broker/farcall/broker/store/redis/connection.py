"""What every part of one Redis store shares: the command connection, the key prefix and the
results' lifetime; and how a record's fields are written into a hash (``flat``) and read back."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

MAX_CONNECTIONS = 100
"""Redis connections a broker process uses for commands (pub/sub has its own one)."""
POOL_WAIT = 5.0
"""Seconds a command waits for a free connection before the request answers 503."""
COMMAND_TIMEOUT = 10.0
"""Seconds a command may wait for Redis's answer (the largest batch script takes milliseconds)."""


class RedisConnection:
    """The connection, key prefix and result lifetime every part of one store shares; each part
    registers the Lua scripts it runs on ``r`` itself."""

    def __init__(self, url: str, prefix: str, result_ttl: int) -> None:
        self.prefix = prefix
        self.result_ttl = result_ttl
        # Any: redis-py's annotations do not model decode_responses=True (we get str, not bytes).
        # A blocking pool: a burst of more commands than connections (hundreds of result
        # streams authenticating at once) waits its turn instead of failing; a few retries
        # carry commands over a Redis restart instead of failing the first one per connection.
        # A read timeout: no command may wait for ever on a connection a restart left mute
        # (seen once in twenty Redis restarts); the caller gets an error and retries instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
            socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=POOL_WAIT)
        self.r: Any = aioredis.Redis(
            connection_pool=pool, retry=Retry(ExponentialBackoff(cap=0.5), 2))

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)


def flat(record: dict[str, Any]) -> dict[str, str]:
    """A record's fields as hash fields: floats by ``repr`` (read back exactly), Nones left out."""
    return {
        k: (repr(v) if isinstance(v, float) else str(v)) for k, v in record.items() if v is not None
    }


def optional_float(value: str | None) -> float | None:
    """A float field ``flat`` wrote, or None where it left the field out (or wrote ``''``)."""
    return float(value) if value else None
