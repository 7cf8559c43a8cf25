"""Broker settings, read from ``FARCALL_*`` environment variables.

A missing Redis or RabbitMQ URL selects the in-process store or queue
(embedded mode), so one command can run the whole system on a laptop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from farcall.serialize import INLINE_BYTES

MB = 1024 * 1024


@dataclass
class Settings:
    """Everything the broker reads from its environment; safe to build by hand in tests."""

    redis_url: str | None = None
    amqp_url: str | None = None
    redis_prefix: str = "farcall:"
    queue_prefix: str = "farcall."
    max_payload_bytes: int = 10 * MB
    result_ttl: int = 7 * 24 * 3600
    endpoint_timeout: float = 30.0
    """Offline after this silence, for an endpoint that did not say its heartbeat period."""
    max_endpoint_losses: int = 3
    """A task running at this many deaths of its endpoint's agent fails instead of going again."""
    rate_limit: float = 500.0
    """Requests per second one token may make, on average (REST calls and batches submitted on
    a result stream); 0 for no limit. Each broker replica counts on its own."""
    rate_burst: int = 2000
    """Requests one token may make at once before ``rate_limit`` applies."""
    auth_failure_rate: float = 1.0
    """Failed authentications per second one client address may make, on average (0: no limit)."""
    auth_failure_burst: int = 30
    """Failed authentications one address may make at once before it is answered 429."""
    max_endpoints: int = 100
    """Endpoints one user may own (0: no limit)."""
    max_functions: int = 50_000
    """Functions one user may have registered (0: no limit)."""
    max_open_tasks: int = 1_000_000
    """Tasks one user may have waiting or running (0: no limit); past it, submissions answer 429."""
    max_timers: int = 1000
    """Timers one user may have, in any state (0: no limit); past it, creating one answers 403."""
    max_task_bytes: int = 1024 * MB
    """Largest arguments or result of one task (they travel as data-plane blobs past
    ``inline_bytes``)."""
    blob_dir: str | None = None
    """Keep blobs as files in this directory (shared by every replica, e.g. an NFS or volume
    mount) instead of in Redis (or in memory, embedded)."""

    def __post_init__(self) -> None:
        if self.max_task_bytes < INLINE_BYTES:
            raise ValueError(
                f"FARCALL_MAX_TASK_BYTES={self.max_task_bytes} is below {INLINE_BYTES}, the size up "
                "to which arguments travel inside the task; set it to at least that")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            redis_url=env.get("FARCALL_REDIS_URL") or None,
            amqp_url=env.get("FARCALL_AMQP_URL") or None,
            redis_prefix=env.get("FARCALL_REDIS_PREFIX", cls.redis_prefix),
            queue_prefix=env.get("FARCALL_QUEUE_PREFIX", cls.queue_prefix),
            max_payload_bytes=_number(env, "FARCALL_MAX_PAYLOAD_BYTES", cls.max_payload_bytes, int),
            result_ttl=_number(env, "FARCALL_RESULT_TTL", cls.result_ttl, int),
            endpoint_timeout=_number(env, "FARCALL_ENDPOINT_TIMEOUT", cls.endpoint_timeout, float),
            max_endpoint_losses=_number(env, "FARCALL_MAX_ENDPOINT_LOSSES",
                                        cls.max_endpoint_losses, int),
            rate_limit=_number(env, "FARCALL_RATE_LIMIT", cls.rate_limit, float),
            rate_burst=_number(env, "FARCALL_RATE_BURST", cls.rate_burst, int),
            auth_failure_rate=_number(env, "FARCALL_AUTH_FAILURE_RATE", cls.auth_failure_rate,
                                      float),
            auth_failure_burst=_number(env, "FARCALL_AUTH_FAILURE_BURST", cls.auth_failure_burst,
                                       int),
            max_endpoints=_number(env, "FARCALL_MAX_ENDPOINTS", cls.max_endpoints, int),
            max_functions=_number(env, "FARCALL_MAX_FUNCTIONS", cls.max_functions, int),
            max_open_tasks=_number(env, "FARCALL_MAX_OPEN_TASKS", cls.max_open_tasks, int),
            max_timers=_number(env, "FARCALL_MAX_TIMERS", cls.max_timers, int),
            max_task_bytes=_number(env, "FARCALL_MAX_TASK_BYTES", cls.max_task_bytes, int),
            blob_dir=env.get("FARCALL_BLOB_DIR") or None,
        )

    @property
    def max_frame_bytes(self) -> int:
        """Largest WebSocket message accepted: a results frame may carry several max-size payloads."""
        return max(64 * 1024 * 1024, 4 * self.max_payload_bytes)

    @property
    def embedded(self) -> bool:
        """True when neither Redis nor RabbitMQ is configured (in-process store and queue)."""
        return self.redis_url is None and self.amqp_url is None


def _number(
    env: Mapping[str, str], name: str, default: float, kind: type[int] | type[float]
) -> Any:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not a number; unset it or give a {kind.__name__}"
        ) from None
