"""RabbitMQ queue (aio-pika): durable queues, persistent messages, publisher confirms.

One connection per broker process (reopened on demand after a failure);
publishing shares one confirming channel, each consumer gets its own channel
(its prefetch and its unacked deliveries, requeued by RabbitMQ when the channel
closes). A batch is published
as a pipeline of messages whose confirms are awaited together, not one by one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from farcall.broker.errors import Unavailable
from farcall.broker.queue.base import Consumer, Delivery, TaskQueue

log = logging.getLogger(__name__)

_DOWN = (aiormq.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError)
CONFIRM_TIMEOUT = 30.0


class RabbitConsumer(Consumer):
    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._buffer: deque[AbstractIncomingMessage] = deque()
        self._arrived = asyncio.Event()
        self._lost: BaseException | None = None
        channel.close_callbacks.add(self._on_close)

    def _on_close(self, _: Any, exc: BaseException | None = None) -> None:
        self._lost = exc or ConnectionError("consumer channel closed")
        self._arrived.set()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.append(message)
        self._arrived.set()

    async def get_batch(self, max_n: int, timeout: float | None = None) -> list[Delivery]:
        if not self._buffer and self._lost is None:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return []
        if self._lost is not None:
            raise Unavailable(f"RabbitMQ closed the consumer channel ({self._lost!r})")
        n = min(max_n, len(self._buffer))
        return [Delivery(m.body, m) for m in (self._buffer.popleft() for _ in range(n))]

    async def ack(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            # Deliveries are taken oldest first and all acked, so "up to the last" is exact.
            await deliveries[-1].handle.ack(multiple=True)

    async def close(self) -> None:
        self._buffer.clear()
        self._lost = self._lost or ConnectionError("consumer closed")
        if not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception as e:  # noqa: BLE001 - closing a broken channel must not mask the cause
                log.debug("closing consumer channel: %r", e)


class RabbitQueue(TaskQueue):
    def __init__(self, url: str, prefix: str = "farcall.") -> None:
        super().__init__(prefix)
        self.url = url
        self._conn: AbstractConnection | None = None
        self._pub: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._channel()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = self._pub = None

    async def _channel(self) -> AbstractChannel:
        """The shared publishing channel, (re)opened on demand."""
        if self._pub is not None and not self._pub.is_closed:
            return self._pub
        async with self._lock:
            try:
                if self._conn is None or self._conn.is_closed:
                    self._conn = await aio_pika.connect(self.url)
                if self._pub is None or self._pub.is_closed:
                    self._pub = await self._conn.channel(publisher_confirms=True)
                    self._declared.clear()
            except _DOWN as e:
                raise Unavailable(f"RabbitMQ is not answering ({e!r}); retry later") from e
            return self._pub

    async def _declare(self, channel: AbstractChannel, endpoint_id: str) -> Any:
        return await channel.declare_queue(self.queue_name(endpoint_id), durable=True)

    async def declare(self, endpoint_id: str) -> None:
        try:
            await self._declare(await self._channel(), endpoint_id)
        except _DOWN as e:
            raise Unavailable(f"RabbitMQ is not answering ({e!r}); retry later") from e
        self._declared.add(endpoint_id)

    async def publish(self, endpoint_id: str, bodies: list[bytes]) -> None:
        if not bodies:
            return
        if endpoint_id not in self._declared:
            await self.declare(endpoint_id)
        channel = await self._channel()
        name = self.queue_name(endpoint_id)
        exchange = channel.default_exchange
        persistent = aio_pika.DeliveryMode.PERSISTENT
        try:
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, delivery_mode=persistent),
                        routing_key=name,
                        timeout=CONFIRM_TIMEOUT,
                    )
                    for body in bodies
                )
            )
        except _DOWN as e:
            raise Unavailable(f"RabbitMQ did not confirm the tasks ({e!r}); retry later") from e

    async def consume(self, endpoint_id: str, prefetch: int) -> Consumer:
        await self._channel()
        assert self._conn is not None
        channel = await self._conn.channel()
        try:
            await channel.set_qos(prefetch_count=max(1, prefetch))
            queue = await self._declare(channel, endpoint_id)
            consumer = RabbitConsumer(channel)
            await queue.consume(consumer._on_message)
        except BaseException:
            await channel.close()
            raise
        return consumer

    async def depth(self, endpoint_id: str) -> int:
        try:
            queue = await self._declare(await self._channel(), endpoint_id)
        except _DOWN as e:
            raise Unavailable(f"RabbitMQ is not answering ({e!r}); retry later") from e
        return int(queue.declaration_result.message_count or 0)

    async def delete(self, endpoint_id: str) -> None:
        channel = await self._channel()
        await channel.queue_delete(self.queue_name(endpoint_id))
        self._declared.discard(endpoint_id)
