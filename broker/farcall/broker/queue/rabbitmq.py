"""RabbitMQ queue (aio-pika): durable queues, persistent messages, publisher confirms.

One connection per broker process, reopened on demand. A plain aio-pika
connection never says it is closed when RabbitMQ drops it (``320
CONNECTION_FORCED`` on a restart), so a close callback forgets it: the next
call connects again, and while RabbitMQ is down every call raises
``Unavailable`` within ``CONNECT_TIMEOUT`` or ``OP_TIMEOUT``. Not
``connect_robust``: its consumers restore themselves behind the endpoint
channel's back, whose ack bookkeeping assumes a consumer ends with its
channel; here a consumer whose channel or connection died raises
``Unavailable`` and the session opens a new one.

Publishing shares one confirming channel, each consumer gets its own channel
(its prefetch and its unacked deliveries, requeued by RabbitMQ when the channel
closes). A batch is published as a pipeline of messages whose confirms are
awaited together, not one by one. Publishing never creates a queue (an
endpoint's registration and its consumer do): a message RabbitMQ cannot route
comes back (``mandatory``) and raises ``QueueMissing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from farcall.broker.errors import Unavailable
from farcall.broker.queue.base import Consumer, Delivery, QueueMissing, TaskQueue

log = logging.getLogger(__name__)

_DOWN = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError,
         asyncio.TimeoutError)
"""What aio-pika raises when RabbitMQ is down, dropped us, or does not answer in time."""
CONNECT_TIMEOUT = 5.0
"""Opening the connection (TCP, AMQP handshake) takes longer only if RabbitMQ is in trouble."""
OP_TIMEOUT = 10.0
"""A declare, delete, get or channel open that takes longer is reported as ``Unavailable``."""
DRAIN_IDLE = 1.0
"""A drain stops waiting for pushed deliveries after this long without one."""
CONFIRM_TIMEOUT = 30.0
"""How long a published batch may wait for RabbitMQ's confirms (it writes them to disk)."""


def _unavailable(what: str, e: BaseException) -> Unavailable:
    return Unavailable(f"RabbitMQ {what} ({e!r}); retry later")


@contextlib.asynccontextmanager
async def _answering(what: str, timeout: float | None = OP_TIMEOUT) -> AsyncIterator[None]:
    """Bound a RabbitMQ call in time (``None``: its steps bound themselves) and turn its failure
    into ``Unavailable``."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except _DOWN as e:
        raise _unavailable(what, e) from e


class RabbitConsumer(Consumer):
    """Deliveries on a channel of its own; ends (``Unavailable``) when that channel or the
    connection under it closes."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self._connection = connection
        self._channel = channel
        self._buffer: deque[AbstractIncomingMessage] = deque()
        self._arrived = asyncio.Event()
        self._lost: BaseException | None = None
        channel.close_callbacks.add(self._on_close)
        connection.close_callbacks.add(self._on_close)

    def _on_close(self, _: Any, exc: BaseException | None = None) -> None:
        if self._lost is None:
            self._lost = exc or ConnectionError("consumer channel closed")
        self._arrived.set()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.append(message)
        self._arrived.set()

    async def get_batch(self, max_n: int, timeout: float | None = None) -> list[Delivery]:
        if not self._buffer and self._lost is None:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return []
        if self._lost is not None:
            raise Unavailable(
                f"RabbitMQ closed the consumer's channel ({self._lost!r}); consume again"
            )
        n = min(max_n, len(self._buffer))
        return [Delivery(m.body, m) for m in (self._buffer.popleft() for _ in range(n))]

    async def ack(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            # Deliveries are taken oldest first and all acked, so "up to the last" is exact.
            async with _answering("lost the consumer's channel before the ack"):
                await deliveries[-1].handle.ack(multiple=True)

    async def close(self) -> None:
        self._buffer.clear()
        self._lost = self._lost or ConnectionError("consumer closed")
        self._connection.close_callbacks.discard(self._on_close)
        if not self._channel.is_closed:
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await self._channel.close()
            except Exception as e:  # noqa: BLE001 - closing a broken channel must not mask the cause
                log.debug("closing consumer channel: %r", e)


class RabbitQueue(TaskQueue):
    def __init__(self, url: str, prefix: str = "farcall.") -> None:
        super().__init__(prefix)
        self.url = url
        self._conn: AbstractConnection | None = None
        self._pub: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._channel()

    async def close(self) -> None:
        conn, self._conn, self._pub = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(*_DOWN):
                async with asyncio.timeout(OP_TIMEOUT):
                    await conn.close()

    def _on_connection_close(self, conn: Any, exc: BaseException | None = None) -> None:
        """RabbitMQ (or we) closed the connection: the next call opens a new one."""
        if conn is self._conn:
            self._conn = self._pub = None
            log.warning("RabbitMQ connection closed (%r); reconnecting on the next call", exc)

    async def _connection(self) -> AbstractConnection:
        """The live connection, opened now if there is none."""
        conn = self._conn
        if conn is not None and not conn.is_closed:
            return conn
        async with self._lock:
            if self._conn is None or self._conn.is_closed:
                async with _answering("is not answering", CONNECT_TIMEOUT):
                    conn = await aio_pika.connect(self.url, timeout=CONNECT_TIMEOUT)
                conn.close_callbacks.add(self._on_connection_close)
                self._conn, self._pub = conn, None
            return self._conn

    async def _channel(self) -> AbstractChannel:
        """The shared publishing channel, (re)opened on demand."""
        pub = self._pub
        if pub is not None and not pub.is_closed and self._conn is not None:
            return pub
        conn = await self._connection()
        async with self._lock:
            if self._pub is None or self._pub.is_closed:
                async with _answering("did not open a channel"):
                    self._pub = await conn.channel(publisher_confirms=True, on_return_raises=True)
            return self._pub

    async def _declare(self, channel: AbstractChannel, endpoint_id: str) -> Any:
        return await channel.declare_queue(self.queue_name(endpoint_id), durable=True,
                                           timeout=OP_TIMEOUT)

    async def ping(self) -> None:
        channel = await self._channel()
        async with _answering("did not answer a ping"):
            # A passive declare of an exchange every vhost has: one round trip, changes nothing.
            await channel.get_exchange("amq.direct", ensure=True)

    async def declare(self, endpoint_id: str) -> None:
        channel = await self._channel()
        async with _answering("did not declare the queue"):
            await self._declare(channel, endpoint_id)

    async def publish(self, endpoint_id: str, bodies: list[bytes]) -> None:
        if not bodies:
            return
        channel = await self._channel()
        name = self.queue_name(endpoint_id)
        exchange = channel.default_exchange
        persistent = aio_pika.DeliveryMode.PERSISTENT
        outcomes = await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(body, delivery_mode=persistent),
                    routing_key=name,
                    mandatory=True,
                    timeout=CONFIRM_TIMEOUT,
                )
                for body in bodies
            ),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        returned = [f for f in failures if isinstance(f, aiormq.exceptions.PublishError)]
        if returned:
            raise QueueMissing(
                f"RabbitMQ has no queue {name!r}: {len(returned)} of {len(bodies)} messages came "
                "back unrouted (was the endpoint deleted?); declare the queue or drop the tasks"
            ) from returned[0]
        if failures:
            down = next((f for f in failures if isinstance(f, _DOWN)), None)
            if down is None:
                raise failures[0]
            raise _unavailable(f"did not confirm {len(failures)} of {len(bodies)} messages",
                               down) from down

    async def consume(self, endpoint_id: str, prefetch: int) -> Consumer:
        conn = await self._connection()
        async with _answering("did not open a consumer"):
            channel = await conn.channel()
            try:
                await channel.set_qos(prefetch_count=max(1, prefetch), timeout=OP_TIMEOUT)
                queue = await self._declare(channel, endpoint_id)
                consumer = RabbitConsumer(conn, channel)
                await queue.consume(consumer._on_message, timeout=OP_TIMEOUT)
            except BaseException:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
        return consumer

    async def _probe(self, endpoint_id: str) -> tuple[AbstractChannel, Any | None]:
        """A channel of its own and the endpoint's queue, or None if there is no such queue.

        Its own: RabbitMQ closes a channel on a passive declare of a missing queue.
        """
        conn = await self._connection()
        channel = await conn.channel()
        try:
            return channel, await channel.get_queue(self.queue_name(endpoint_id), ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return channel, None
        except BaseException:
            await _close_quietly(channel)
            raise

    async def depth(self, endpoint_id: str) -> int:
        async with _answering("did not report the queue's depth"):
            channel, queue = await self._probe(endpoint_id)
            try:
                return 0 if queue is None else int(queue.declaration_result.message_count or 0)
            finally:
                await _close_quietly(channel)

    async def drain(self, endpoint_id: str) -> list[bytes]:
        # Pushed to a consumer without a prefetch limit (one get per message is a round trip
        # each), then fetched one by one until the queue says it is empty. Each step is bounded on
        # its own, and all are acked at the end: a drain cut short leaves the queue as it was.
        async with _answering("did not hand over the queue's messages"):
            channel, queue = await self._probe(endpoint_id)
        try:
            if queue is None:
                return []
            taken: list[AbstractIncomingMessage] = []
            async with _answering("did not hand over the queue's messages", timeout=None):
                waiting = int(queue.declaration_result.message_count or 0)
                if waiting:
                    await _take_pushed(queue, waiting, taken)
                while (message := await queue.get(fail=False, timeout=OP_TIMEOUT)) is not None:
                    taken.append(message)
                drained = sorted(taken, key=lambda m: m.delivery_tag or 0)
                if drained:
                    await drained[-1].ack(multiple=True)
            return [m.body for m in drained]
        finally:
            await _close_quietly(channel)

    async def delete(self, endpoint_id: str) -> None:
        channel = await self._channel()
        async with _answering("did not delete the queue"):
            await channel.queue_delete(self.queue_name(endpoint_id), timeout=OP_TIMEOUT)


async def _take_pushed(queue: Any, expected: int, taken: list[AbstractIncomingMessage]) -> None:
    """Consume until ``expected`` messages came, or none came for ``DRAIN_IDLE`` (another
    consumer took the rest); the deliveries are appended to ``taken``, unacked."""
    progress = asyncio.Event()

    async def arrived(message: AbstractIncomingMessage) -> None:
        taken.append(message)
        progress.set()

    tag = await queue.consume(arrived, timeout=OP_TIMEOUT)
    try:
        while len(taken) < expected:
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), DRAIN_IDLE)
            except TimeoutError:
                break
    finally:
        await queue.cancel(tag, timeout=OP_TIMEOUT)


async def _close_quietly(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(Exception):
            await channel.close()
