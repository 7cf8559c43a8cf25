"""Pub/sub channels across broker replicas, through Redis pub/sub (``<prefix>pubsub:<channel>``).

A frame is published as ``<replica id> <frame>``; a replica hands its own frames
to its subscribers directly and skips them when they come back from Redis.

A process reads pub/sub on ONE Redis connection of its own (never one from the
command pool, so open result streams cannot starve REST calls): a channel
is subscribed when its first local subscriber arrives and unsubscribed when the
last one leaves, and one reader task fans frames out in memory. When that
connection dies (a Redis restart), every local subscription ends, because frames
published meanwhile are lost: clients reconnect and catch up by polling. The next
subscribe connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.client import PubSub as RedisPubSubConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from farcall.broker.errors import Unavailable
from farcall.broker.store.base import LocalSubscription, PubSub, Subscription, deliver_locally

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
"""Connecting, or Redis confirming a SUBSCRIBE, takes longer only when Redis is in trouble."""

_NOT_COPIED = {"client_name", "socket_timeout", "retry", "retry_on_error", "retry_on_timeout",
               "health_check_interval", "maint_notifications_pool_handler", "himport_registry"}
"""Connection settings of the command pool that the pub/sub connection sets itself, or that
belong to that pool (a pub/sub connection waits idle for frames: no read timeout)."""


class _Link:
    """One pub/sub connection, what it has subscribed, and its reader."""

    def __init__(self, pubsub: RedisPubSubConnection, pool: ConnectionPool) -> None:
        self.pubsub, self.pool = pubsub, pool
        self.subscribed: dict[str, asyncio.Future[None]] = {}
        """Channel -> the confirmation of the SUBSCRIBE that subscribed it (no UNSUBSCRIBE since)."""
        self.confirming: dict[str, deque[asyncio.Future[None]]] = {}
        """Channel -> SUBSCRIBEs sent and not yet confirmed, oldest first (Redis answers in order)."""
        self.writing = asyncio.Lock()
        """Held from a change of ``subscribed`` until its command is written, so the commands
        reach Redis in the order of the changes (an UNSUBSCRIBE never overtakes a SUBSCRIBE)."""
        self.reader: asyncio.Task[None] | None = None
        self.dead = False

    def confirmed(self, channel: str) -> None:
        waiting = self.confirming.get(channel)
        if waiting:
            waiter = waiting.popleft()
            if not waiting:
                del self.confirming[channel]
            if not waiter.done():
                waiter.set_result(None)

    def fail_waiters(self, error: BaseException) -> None:
        for waiting in self.confirming.values():
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_exception(error)
                    waiter.exception()  # retrieved here: a waiter may have gone
        self.confirming.clear()
        self.subscribed.clear()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.pool.disconnect()


class _Subscription(LocalSubscription):
    """A local subscriber; leaving as a channel's last one unsubscribes the channel in Redis."""

    def __init__(self, owner: RedisPubSub, channel: str) -> None:
        super().__init__(owner._subscribers, channel)
        self._owner = owner

    async def close(self) -> None:
        await super().close()
        await self._owner._release(self._channel)


class RedisPubSub(PubSub):
    def __init__(self, r: Any, prefix: str) -> None:
        self._r, self._prefix = r, prefix
        self.replica = uuid.uuid4().hex[:12]
        self.client_name = f"farcall-pubsub-{self.replica}"
        """The pub/sub connection's name in Redis's CLIENT LIST."""
        self._subscribers: dict[str, set[LocalSubscription]] = {}
        self._link: _Link | None = None
        self._lock = asyncio.Lock()

    def _redis_channel(self, channel: str) -> str:
        return f"{self._prefix}pubsub:{channel}"

    async def publish(self, channel: str, frame: str) -> None:
        """Subscribers on this replica get the frame at once; the others through Redis."""
        deliver_locally(self._subscribers, channel, frame)
        await self._r.publish(self._redis_channel(channel), f"{self.replica} {frame}")

    async def subscribe(self, channel: str) -> Subscription:
        link = await self._connected()
        sub = _Subscription(self, channel)
        try:
            confirmation = await self._subscribed(link, self._redis_channel(channel))
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await asyncio.shield(confirmation)
        except BaseException as e:
            await sub.close()
            if isinstance(e, Exception):
                raise Unavailable(
                    f"Redis did not confirm the result subscription ({e!r}); retry later"
                ) from e
            raise
        return sub

    async def _subscribed(self, link: _Link, channel: str) -> asyncio.Future[None]:
        """The confirmation of the channel's subscription on ``link``, subscribing it if needed."""
        async with link.writing:
            if link.dead:  # it died since the caller got it; its pubsub would quietly reconnect
                raise ConnectionError("the Redis pub/sub connection was lost")
            confirmation = link.subscribed.get(channel)
            if confirmation is None:
                confirmation = asyncio.get_running_loop().create_future()
                link.subscribed[channel] = confirmation
                link.confirming.setdefault(channel, deque()).append(confirmation)
                try:
                    await link.pubsub.subscribe(channel)
                except Exception as e:
                    # The connection is in an unknown state: drop it; the next subscribe reconnects.
                    log.warning("Redis pub/sub: SUBSCRIBE failed (%r); dropping the connection", e)
                    if link.reader is not None:
                        link.reader.cancel()
                    raise
            return confirmation

    async def close(self) -> None:
        """End every subscription and drop the pub/sub connection."""
        link, self._link = self._link, None
        if link is not None and link.reader is not None:
            link.reader.cancel()
            await asyncio.gather(link.reader, return_exceptions=True)

    async def _connected(self) -> _Link:
        """The live pub/sub connection, opened now (with its reader) if there is none."""
        link = self._link
        if link is not None and not link.dead:
            return link
        async with self._lock:
            if self._link is None or self._link.dead:
                self._link = await self._open()
            return self._link

    async def _open(self) -> _Link:
        command_pool = self._r.connection_pool
        settings = {k: v for k, v in command_pool.connection_kwargs.items() if k not in _NOT_COPIED}
        pool = ConnectionPool(
            connection_class=command_pool.connection_class,
            max_connections=1,
            client_name=self.client_name,
            # A dropped connection ends the reader, which ends every subscription; redis-py's own
            # reconnect-and-resubscribe would hide the frames lost meanwhile.
            retry=Retry(NoBackoff(), 0),
            **settings,
        )
        link = _Link(RedisPubSubConnection(pool), pool)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await link.pubsub.connect()
        except BaseException as e:  # a cancel too: a half-open connection must not leak
            await link.close()
            if isinstance(e, Exception):
                raise Unavailable(f"Redis is not answering ({e!r}); retry later") from e
            raise
        link.reader = asyncio.create_task(self._read(link), name=self.client_name)
        return link

    async def _read(self, link: _Link) -> None:
        """Hand every frame to this replica's subscribers of its channel, until the connection ends."""
        lost: BaseException | None = None
        skip = len(self._prefix) + len("pubsub:")
        try:
            while True:
                response = await link.pubsub.parse_response(block=True)
                message = await link.pubsub.handle_message(response)
                if message is None:
                    continue
                kind, channel = message["type"], message["channel"]
                if kind == "message":
                    origin, _, frame = message["data"].partition(" ")
                    if origin != self.replica:
                        deliver_locally(self._subscribers, channel[skip:], frame)
                elif kind == "subscribe":
                    link.confirmed(channel)
        except Exception as e:  # noqa: BLE001 - any failure ends the connection and its streams
            lost = e
        finally:
            await self._drop(link, lost)

    async def _drop(self, link: _Link, lost: BaseException | None) -> None:
        """The connection ended: end every local subscription, forget the connection."""
        link.dead = True
        if self._link is link:
            self._link = None
        link.fail_waiters(lost or ConnectionError("the pub/sub connection was closed"))
        channels = list(self._subscribers.values())
        self._subscribers.clear()
        ended = 0
        for subs in channels:
            for sub in subs:
                sub.put(None)
                ended += 1
        if lost is not None:
            log.warning("Redis pub/sub connection lost (%r); ended %d subscriptions "
                        "(result streams catch up by polling); reconnecting on the next subscribe",
                        lost, ended)
        await link.close()

    async def _release(self, channel: str) -> None:
        """Unsubscribe the channel in Redis once its last local subscriber has left."""
        link, redis_channel = self._link, self._redis_channel(channel)
        if link is None:
            return
        async with link.writing:
            if channel in self._subscribers or link.dead:
                return
            if link.subscribed.pop(redis_channel, None) is None:
                return
            try:
                await link.pubsub.unsubscribe(redis_channel)
            except Exception as e:  # noqa: BLE001 - the reader sees a dead connection and ends it
                log.debug("unsubscribing %s: %r", redis_channel, e)
