"""The task queue interface: one durable queue per endpoint, so tasks wait while it is offline.

Bodies are opaque bytes (``TaskMessage`` JSON) to the queue. A consumer hands
out deliveries in batches; the endpoint channel acks each batch as soon as it
has recorded it, so no delivery stays unacked while its task runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from farcall.broker.errors import Unavailable


class QueueMissing(Unavailable):
    """The endpoint's queue does not exist (its endpoint was deleted, or RabbitMQ lost it), so a
    publish could not be kept; the tasks were not queued. Without a handler this answers 503."""


@dataclass(frozen=True)
class Delivery:
    """One queued body; ``handle`` belongs to the queue implementation."""

    body: bytes
    handle: Any = None


class Consumer(abc.ABC):
    """Deliveries from one endpoint's queue, at most ``prefetch`` unacked at a time."""

    @abc.abstractmethod
    async def get_batch(self, max_n: int, timeout: float | None = None) -> list[Delivery]:
        """Wait for at least one delivery (or ``timeout``, then ``[]``); return up to ``max_n``.

        Deliveries come oldest first and are taken without waiting for more once one is there.
        """

    @abc.abstractmethod
    async def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge deliveries; they must be every delivery taken so far and not yet acked."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming; every unacked delivery goes back to the queue."""


class TaskQueue(abc.ABC):
    def __init__(self, prefix: str = "farcall.") -> None:
        self.prefix = prefix

    def queue_name(self, endpoint_id: str) -> str:
        return f"{self.prefix}ep.{endpoint_id}"

    async def start(self) -> None:
        """Connect (and fail fast if the backing service does not answer)."""
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        """Return if the backing service answers now; raise otherwise (for ``/v1/health``)."""
        return None

    @abc.abstractmethod
    async def declare(self, endpoint_id: str) -> None:
        """Create the endpoint's queue if it does not exist (idempotent)."""

    @abc.abstractmethod
    async def publish(self, endpoint_id: str, bodies: list[bytes]) -> None:
        """Queue bodies durably; returns once the queue confirmed all of them.

        Never creates the queue (``declare`` and ``consume`` do): ``QueueMissing`` if it is not
        there, ``Unavailable`` if the queue service is down (some bodies may then be queued).
        """

    @abc.abstractmethod
    async def consume(self, endpoint_id: str, prefetch: int) -> Consumer:
        """Start taking deliveries (declaring the queue if needed); ``get_batch`` raises
        ``Unavailable`` once the consumer is lost, and a new one must be opened."""

    @abc.abstractmethod
    async def depth(self, endpoint_id: str) -> int:
        """Messages waiting in the queue (not counting unacked deliveries); 0 if it does not exist."""

    @abc.abstractmethod
    async def drain(self, endpoint_id: str) -> list[bytes]:
        """Take every message waiting in the queue (acked: gone from the queue), oldest first.

        For deleting an endpoint: its waiting tasks are failed, not left queued for ever.
        A queue that does not exist gives ``[]``.
        """

    @abc.abstractmethod
    async def delete(self, endpoint_id: str) -> None: ...
