"""What a broker process holds: its settings, its store, its queue and its blob store, chosen
from the settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from farcall.backoff import Backoff
from farcall.broker import auth
from farcall.broker.cache import TTLCache
from farcall.broker.errors import Forbidden, TooManyRequests, Unauthorized
from farcall.broker.limits import RateLimiter, Slots
from farcall.broker.queue.base import TaskQueue
from farcall.broker.records import FunctionRecord
from farcall.broker.sessions import Sessions
from farcall.broker.settings import Settings
from farcall.broker.store.base import BlobStore, Principal, Store, Subscription
from farcall.protocol.control import AccessRevoked, parse_revocation

if TYPE_CHECKING:
    from farcall.broker.user_endpoints import Manager

TOKEN_CACHE_SECONDS = 1.0
"""A revoked token stops working on every replica within this time even if the revocation's
broadcast is lost (it normally arrives at once)."""
OWNER_CACHE_SECONDS = 5.0
"""A deleted endpoint or function stops taking tasks on every replica within this time (at once
on the replica that deleted it); an unshared one at once everywhere (``AccessRevoked``), unless
the broadcast is lost."""

log = logging.getLogger(__name__)

Closer = Callable[[], Coroutine[Any, Any, None]]
"""Closes one result stream or blob transfer (when its token is revoked)."""


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


def make_blobs(settings: Settings) -> BlobStore:
    """Files in ``blob_dir`` when it is set, else Redis when ``redis_url`` is, else memory."""
    if settings.blob_dir:
        from farcall.broker.store.files import FileBlobs, sweep_period

        return FileBlobs(settings.blob_dir, sweep_period(settings.result_ttl))
    if settings.redis_url:
        from farcall.broker.store.redis.blobs import RedisBlobs

        return RedisBlobs(settings.redis_url, settings.redis_prefix)
    from farcall.broker.store.memory.blobs import MemoryBlobs

    return MemoryBlobs()


EndpointAccess = tuple[str, frozenset[str], bool, str]
"""What a submission needs to know of an endpoint (``SubmissionContext``): its owner, whom it is
shared with, whether it is a multi-user endpoint's manager, and (a user endpoint) its manager."""


def _owner_cache() -> TTLCache[str, str]:
    return TTLCache[str, str](OWNER_CACHE_SECONDS)


@dataclass
class Services:
    """The store and queue, and what this replica keeps in memory to spare them a round trip."""

    settings: Settings
    store: Store
    queue: TaskQueue
    blobs: BlobStore
    """Data-plane blobs (big arguments and results)."""
    principals: TTLCache[str, Principal] = field(
        default_factory=lambda: TTLCache[str, Principal](TOKEN_CACHE_SECONDS)
    )
    """Token hash -> who holds it: every REST request asks."""
    endpoint_access: TTLCache[str, EndpointAccess] = field(
        default_factory=lambda: TTLCache[str, EndpointAccess](OWNER_CACHE_SECONDS))
    """Endpoint id -> its owner's user id, the ids of the users it is shared with, whether it is
    a multi-user endpoint's manager, and the manager of a user endpoint."""
    managers: TTLCache[str, Manager] = field(
        default_factory=lambda: TTLCache[str, "Manager"](OWNER_CACHE_SECONDS))
    """Multi-user endpoint id -> its record and schema (``user_endpoints``)."""
    user_endpoints: TTLCache[str, str] = field(default_factory=_owner_cache)
    """User endpoint id -> its manager's id, for those known to exist (``user_endpoints``)."""
    group_owners: TTLCache[str, str] = field(default_factory=_owner_cache)
    """Task group id -> its owner's user id."""
    functions: TTLCache[str, FunctionRecord] = field(
        default_factory=lambda: TTLCache[str, FunctionRecord](OWNER_CACHE_SECONDS)
    )
    """Function id -> its record with the body: every submission checks the owner, and a
    channel session sends each body to its endpoint once."""
    sessions: Sessions = field(default_factory=Sessions)
    """Endpoint id -> its channel session on this replica, for sending new tasks directly."""
    token_streams: dict[str, set[Closer]] = field(default_factory=dict)
    """User token id -> how to close each result stream opened with it (on revocation)."""
    requests: RateLimiter = field(init=False)
    """Requests per user (all their tokens together), and the runs of their timers."""
    auth_failures: RateLimiter = field(init=False)
    """Failed authentications per client address."""
    uploads: Slots = field(init=False)
    """Blob uploads in progress per user (the blob's owner)."""
    _revocations: asyncio.Task[None] | None = None
    _broker_id: str = ""

    def __post_init__(self) -> None:
        s = self.settings
        self.requests = RateLimiter(s.rate_limit, s.rate_burst)
        self.auth_failures = RateLimiter(s.auth_failure_rate, s.auth_failure_burst)
        self.uploads = Slots(s.max_uploads_per_user)

    async def broker_id(self) -> str:
        """The deployment's identity (``Store.broker_id``): asked of the store once per process,
        as it never changes. Raises like the store while the store does not answer."""
        if not self._broker_id:
            self._broker_id = await self.store.broker_id()
        return self._broker_id

    async def lookup(self, token: str) -> Principal | None:
        """Who holds ``token`` (cached briefly: every REST request needs this answer)."""
        digest = auth.token_hash(token)
        found = self.principals.get(digest)
        if found is None:
            found = await auth.authenticate(self.store.users, token)
            if found is not None:
                self.principals.put(digest, found)
        return found

    async def authenticate(
        self, token: str | None, address: str, kind: Literal["user", "endpoint"] = "user"
    ) -> Principal:
        """Who sends this request: raises ``Unauthorized`` (no or unknown token), ``Forbidden``
        (an endpoint credential where a user token belongs, or the reverse) or, for an unknown
        token from an address that failed too often lately, ``TooManyRequests``. A valid token
        is never refused for its address's failures (a lab behind one NAT address)."""
        principal = None
        if token:  # endpoint credentials uncached: connects are rare, and a deleted one must fail
            principal = await (self.lookup(token) if kind == "user"
                               else auth.authenticate(self.store.users, token))
        if principal is None:
            wait = self.auth_failures.take(address)
            if wait:
                raise TooManyRequests(
                    "too many requests with a missing or wrong token from this address; wait, "
                    "and check the token (FARCALL_TOKEN)", wait)
            if not token:
                raise Unauthorized("no token: send 'Authorization: Bearer <your user token>'")
            raise Unauthorized("the token is unknown or revoked, or its user is disabled; ask "
                               "your broker operator for a new one")
        if principal.kind != kind:
            raise Forbidden(
                "an endpoint credential may only open its endpoint's channel; use a user token"
                if kind == "user" else "a user token cannot connect as an endpoint; use the "
                "endpoint's credential (farcall-endpoint start does)")
        return principal

    def charge(self, principal: Principal) -> None:
        """Count one request against the user's rate limit (shared by all their tokens: minting
        tokens buys no extra rate); ``TooManyRequests`` past it."""
        wait = self.charge_user(principal.id) if principal.kind == "user" else (
            self.requests.take(principal.token_hash))
        if wait:
            raise TooManyRequests(
                f"you are over the broker's limit of {self.settings.rate_limit:g} requests per "
                "second (all your tokens together); send bigger batches or fewer requests", wait)

    def charge_user(self, user_id: str) -> float:
        """Spend one from the user's bucket: 0.0, or (spending nothing) the seconds until it
        holds one. A timer's run is charged here too, on the replica that fires it."""
        return self.requests.take(f"user:{user_id}")

    def watch_token(self, token_id: str, close: Closer) -> Callable[[], None]:
        """Call ``close`` if the token is revoked; returns the function that stops watching."""
        closers = self.token_streams.setdefault(token_id, set())
        closers.add(close)

        def unwatch() -> None:
            closers.discard(close)
            if not closers and self.token_streams.get(token_id) is closers:
                del self.token_streams[token_id]

        return unwatch

    async def _subscribe_revocations(self) -> Subscription | None:
        try:
            return await self.store.pubsub.subscribe_revocations()
        except Exception as e:  # noqa: BLE001 - the store may be down; the follower tries again
            log.info("cannot follow token revocations yet: %r", e)
            return None

    async def _follow_revocations(self, subscription: Subscription | None) -> None:
        """Drop revoked tokens from the cache and close their streams, and drop the access
        caches of unshared endpoints and functions, as revocations arrive from any replica (or
        ``farcall-broker``); subscribe again after a drop."""
        backoff = Backoff(cap=5.0)
        while True:
            if subscription is None:
                await asyncio.sleep(backoff.next_delay())
                subscription = await self._subscribe_revocations()
                continue
            backoff.reset()
            try:
                async for frame in subscription:
                    self._revoked(frame)
            finally:
                await subscription.close()
            subscription = None

    def _revoked(self, frame: str) -> None:
        try:
            revoked = parse_revocation(frame)
        except ValidationError:
            log.warning("ignoring a malformed revocation message")
            return
        if isinstance(revoked, AccessRevoked):
            if revoked.endpoint_id:
                self.endpoint_access.pop(revoked.endpoint_id)
                self.managers.pop(revoked.endpoint_id)
                self.user_endpoints.pop(revoked.endpoint_id)
            if revoked.function_id:
                self.functions.pop(revoked.function_id)
            return
        self.principals.pop(revoked.token_hash)
        closers = self.token_streams.pop(revoked.token_id, set())
        if closers:
            log.info("token %s revoked: closing %d result streams and transfers",
                     revoked.token_id, len(closers))
        for close in closers:
            asyncio.get_running_loop().create_task(close())

    @classmethod
    def build(
        cls, settings: Settings, store: Store | None = None, queue: TaskQueue | None = None
    ) -> Services:
        return cls(settings, store or make_store(settings), queue or make_queue(settings),
                   make_blobs(settings))

    async def start(self) -> None:
        """Connect; a service that is down is retried on demand (requests answer 503 meanwhile)."""
        for part in (self.store, self.queue, self.blobs):
            try:
                await part.start()
            except Exception as e:  # noqa: BLE001 - the broker must come up to answer 503 and health
                log.warning(
                    "%s is not answering at start-up (%r); retrying on demand",
                    type(part).__name__,
                    e,
                )
        # Subscribed here, not in the follower: a subscription cut short by a cancel at shutdown
        # could leave the pub/sub connection half made.
        first = await self._subscribe_revocations()
        self._revocations = asyncio.get_running_loop().create_task(self._follow_revocations(first))

    async def close(self) -> None:
        if self._revocations is not None:
            self._revocations.cancel()
            with contextlib.suppress(BaseException):
                await self._revocations
        for part in (self.queue, self.store, self.blobs):
            try:
                await part.close()
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing %s: %r", type(part).__name__, e)
