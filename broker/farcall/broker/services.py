"""What a broker process holds: its settings, its store and its queue, chosen from the settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from farcall.broker import auth
from farcall.broker.cache import TTLCache
from farcall.broker.queue.base import TaskQueue
from farcall.broker.settings import Settings
from farcall.broker.store.base import Principal, Store
from farcall.records import FunctionRecord

if TYPE_CHECKING:
    from farcall.broker.endpoint_channel import EndpointSession

TOKEN_CACHE_SECONDS = 10.0
"""A revoked user token stops working on every replica within this time."""
OWNER_CACHE_SECONDS = 5.0
"""A deleted endpoint or function stops taking tasks on every replica within this time."""

log = logging.getLogger(__name__)


def make_store(settings: Settings) -> Store:
    """Redis when ``redis_url`` is set, otherwise the in-process store."""
    if settings.redis_url:
        from farcall.broker.store.redis import RedisStore

        return RedisStore(settings.redis_url, settings.redis_prefix, settings.result_ttl)
    from farcall.broker.store.memory import MemoryStore

    return MemoryStore()


def make_queue(settings: Settings) -> TaskQueue:
    """RabbitMQ when ``amqp_url`` is set, otherwise the in-process queue."""
    if settings.amqp_url:
        from farcall.broker.queue.rabbitmq import RabbitQueue

        return RabbitQueue(settings.amqp_url, settings.queue_prefix)
    from farcall.broker.queue.memory import MemoryQueue

    return MemoryQueue(settings.queue_prefix)


def _owner_cache() -> TTLCache[str, str]:
    return TTLCache[str, str](OWNER_CACHE_SECONDS)


@dataclass
class Services:
    """The store and queue, and what this replica keeps in memory to spare them a round trip."""

    settings: Settings
    store: Store
    queue: TaskQueue
    principals: TTLCache[str, Principal] = field(
        default_factory=lambda: TTLCache[str, Principal](TOKEN_CACHE_SECONDS)
    )
    """Token hash -> who holds it: every REST request asks."""
    endpoint_owners: TTLCache[str, str] = field(default_factory=_owner_cache)
    """Endpoint id -> its owner's user id (never changes; a deleted endpoint drops out in time)."""
    group_owners: TTLCache[str, str] = field(default_factory=_owner_cache)
    """Task group id -> its owner's user id."""
    functions: TTLCache[str, FunctionRecord] = field(
        default_factory=lambda: TTLCache[str, FunctionRecord](OWNER_CACHE_SECONDS)
    )
    """Function id -> its record with the body: every submission checks the owner, and a
    channel session sends each body to its endpoint once."""
    sessions: dict[str, EndpointSession] = field(default_factory=dict)
    """Endpoint id -> its channel session on this replica, for sending new tasks directly."""

    async def authenticate_user(self, token: str) -> Principal | None:
        """Who holds ``token`` (cached briefly: every REST request needs this answer)."""
        digest = auth.token_hash(token)
        found = self.principals.get(digest)
        if found is None:
            found = await auth.authenticate(self.store.users, token)
            if found is not None:
                self.principals.put(digest, found)
        return found

    @classmethod
    def build(
        cls, settings: Settings, store: Store | None = None, queue: TaskQueue | None = None
    ) -> Services:
        return cls(settings, store or make_store(settings), queue or make_queue(settings))

    async def start(self) -> None:
        """Connect; a service that is down is retried on demand (requests answer 503 meanwhile)."""
        for part in (self.store, self.queue):
            try:
                await part.start()
            except Exception as e:  # noqa: BLE001 - the broker must come up to answer 503 and health
                log.warning(
                    "%s is not answering at start-up (%r); retrying on demand",
                    type(part).__name__,
                    e,
                )

    async def close(self) -> None:
        for part in (self.queue, self.store):
            try:
                await part.close()
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing %s: %r", type(part).__name__, e)
