"""In-process store for embedded mode and unit tests: same semantics as Redis, nothing persisted.

One module per part (``users``, ``functions``, ``endpoints``, ``tasks``, ``inflight``,
``unqueued``, ``pubsub``, ``actions``, ``timers``; ``blobs`` is the in-process ``BlobStore``). All methods run
on one event loop, so each is atomic without locks. The parts share one ``state.State``, as the
Redis parts share one database. Records handed out are copies, so a caller cannot change the
store by changing them.
"""

from __future__ import annotations

import uuid

from farcall.broker.store.base import Store
from farcall.broker.store.memory.actions import MemoryActions
from farcall.broker.store.memory.endpoints import MemoryEndpoints
from farcall.broker.store.memory.functions import MemoryFunctions
from farcall.broker.store.memory.inflight import MemoryInflight
from farcall.broker.store.memory.pubsub import MemoryPubSub
from farcall.broker.store.memory.state import State
from farcall.broker.store.memory.tasks import MemoryTasks
from farcall.broker.store.memory.timers import MemoryTimers
from farcall.broker.store.memory.unqueued import MemoryUnqueued
from farcall.broker.store.memory.users import MemoryUsers

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    def __init__(self) -> None:
        state = State()
        self.users = MemoryUsers(state)
        self.functions = MemoryFunctions(state)
        self.endpoints = MemoryEndpoints(state)
        self.tasks = MemoryTasks(state)
        self.inflight = MemoryInflight(state)
        self.unqueued = MemoryUnqueued(state)
        self.actions = MemoryActions()
        self.pubsub = MemoryPubSub(state)
        self.timers = MemoryTimers()
        self._broker_id = str(uuid.uuid4())

    async def broker_id(self) -> str:
        """A new identity per process: an embedded broker forgets its endpoints when it stops."""
        return self._broker_id
