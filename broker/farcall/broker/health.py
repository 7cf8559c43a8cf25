"""``GET /v1/health``: whether this replica's store, queue and blob store answer now, and which
broker deployment this is (``broker_id``: an endpoint asks before it uses a stored credential).

A load balancer takes a replica out while any is down; the body says which
one and why, so an operator need not dig through logs. All are asked at once,
each within ``PING_TIMEOUT``, so the answer never hangs on a silent service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from farcall.broker.services import Services
from farcall.protocol.rest import Health
from farcall.version import __version__

log = logging.getLogger(__name__)

PING_TIMEOUT = 2.0
"""Longer than a healthy Redis or RabbitMQ ever takes on a network, short enough for a prober."""


async def _probe(ping: Callable[[], Awaitable[None]], timeout: float) -> str:
    """``ok``, or why the service is not answering."""
    try:
        async with asyncio.timeout(timeout):
            await ping()
    except TimeoutError:
        return f"not answering: no answer within {timeout:g} s"
    except Exception as e:  # noqa: BLE001 - every failure is an answer here, not an error
        return f"not answering: {e!r}"
    return "ok"


async def _identity(svc: Services, timeout: float) -> str:
    """The broker id (known after the store first answered), or "" while the store is silent."""
    try:
        async with asyncio.timeout(timeout):
            return await svc.broker_id()
    except Exception:  # noqa: BLE001 - the store's own probe says why
        return ""


async def check(svc: Services, timeout: float = PING_TIMEOUT) -> tuple[int, Health]:
    """The HTTP status (200 or 503) and body for ``/v1/health``."""
    names = ("store", "queue", "blobs")
    broker_id, *answers = await asyncio.gather(
        _identity(svc, timeout),
        _probe(svc.store.ping, timeout), _probe(svc.queue.ping, timeout),
        _probe(svc.blobs.ping, timeout),  # a blob directory unmounted or not writable
    )
    services = dict(zip(names, answers, strict=True))
    if all(answer == "ok" for answer in answers):
        return 200, Health(status="ok", version=__version__, services=services,
                           broker_id=broker_id)
    log.warning("health: %s", services)
    return 503, Health(status="unavailable", version=__version__, services=services,
                       broker_id=broker_id)
