"""In-process queue for embedded mode and unit tests; nothing survives the process."""

from __future__ import annotations

import asyncio
from collections import deque

from farcall.broker.queue.base import Consumer, Delivery, QueueMissing, TaskQueue


class _Queue:
    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.changed = asyncio.Event()

    def put(self, bodies: list[bytes], front: bool = False) -> None:
        if front:
            self.items.extendleft(reversed(bodies))
        else:
            self.items.extend(bodies)
        if bodies:
            self.changed.set()


class MemoryConsumer(Consumer):
    def __init__(self, queue: _Queue, prefetch: int) -> None:
        self._queue = queue
        self._prefetch = max(1, prefetch)
        self._unacked: list[bytes] = []
        self._closed = False

    async def get_batch(self, max_n: int, timeout: float | None = None) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._closed:
            room = min(max_n, self._prefetch - len(self._unacked))
            if room > 0 and self._queue.items:
                taken = [
                    self._queue.items.popleft() for _ in range(min(room, len(self._queue.items)))
                ]
                self._unacked.extend(taken)
                return [Delivery(body) for body in taken]
            self._queue.changed.clear()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return []
            try:
                async with asyncio.timeout(left):
                    await self._queue.changed.wait()
            except TimeoutError:
                return []
        return []

    async def ack(self, deliveries: list[Delivery]) -> None:
        del self._unacked[: len(deliveries)]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(self._unacked, front=True)
            self._unacked = []


class MemoryQueue(TaskQueue):
    def __init__(self, prefix: str = "farcall.") -> None:
        super().__init__(prefix)
        self._queues: dict[str, _Queue] = {}

    def _get(self, endpoint_id: str) -> _Queue:
        return self._queues.setdefault(self.queue_name(endpoint_id), _Queue())

    async def declare(self, endpoint_id: str) -> None:
        self._get(endpoint_id)

    async def publish(self, endpoint_id: str, bodies: list[bytes]) -> None:
        queue = self._queues.get(self.queue_name(endpoint_id))
        if queue is None:
            raise QueueMissing(f"no queue for endpoint {endpoint_id} (was it deleted?); "
                               "declare the queue or drop the tasks")
        queue.put(list(bodies))

    async def consume(self, endpoint_id: str, prefetch: int) -> Consumer:
        return MemoryConsumer(self._get(endpoint_id), prefetch)

    async def depth(self, endpoint_id: str) -> int:
        queue = self._queues.get(self.queue_name(endpoint_id))
        return 0 if queue is None else len(queue.items)

    async def drain(self, endpoint_id: str) -> list[bytes]:
        queue = self._queues.get(self.queue_name(endpoint_id))
        if queue is None:
            return []
        bodies = list(queue.items)
        queue.items.clear()
        return bodies

    async def delete(self, endpoint_id: str) -> None:
        self._queues.pop(self.queue_name(endpoint_id), None)
