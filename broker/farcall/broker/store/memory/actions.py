"""In-process ``ActionStore`` (embedded mode and unit tests): the Redis one's semantics, expiry
checked on each read since nothing sweeps process memory."""

from __future__ import annotations

from farcall.broker.records import ActionRecord
from farcall.broker.store.base import ActionStore
from farcall.protocol.common import now


class MemoryActions(ActionStore):
    def __init__(self) -> None:
        self._actions: dict[str, tuple[ActionRecord, float]] = {}
        """action id -> (record, when it expires)"""
        self._requests: dict[tuple[str, str], str] = {}
        """(creator's user id, request id) -> action id"""

    def _live(self, action_id: str) -> ActionRecord | None:
        found = self._actions.get(action_id)
        if found is None:
            return None
        record, expires = found
        if expires <= now():
            self._forget(record)
            return None
        return record

    def _forget(self, record: ActionRecord) -> None:
        self._actions.pop(record.action_id, None)
        key = (record.user_id, record.request_id)
        if self._requests.get(key) == record.action_id:
            del self._requests[key]

    async def create(self, action: ActionRecord, ttl: float) -> ActionRecord:
        existing = self._requests.get((action.user_id, action.request_id))
        if existing is not None and (found := self._live(existing)) is not None:
            return found.model_copy(deep=True)
        self._requests[(action.user_id, action.request_id)] = action.action_id
        self._actions[action.action_id] = (action.model_copy(deep=True), now() + ttl)
        return action

    async def get(self, action_id: str) -> ActionRecord | None:
        found = self._live(action_id)
        return None if found is None else found.model_copy(deep=True)

    async def update(self, action: ActionRecord, ttl: float) -> bool:
        if self._live(action.action_id) is None:
            return False
        self._actions[action.action_id] = (action.model_copy(deep=True), now() + ttl)
        return True

    async def release(self, action: ActionRecord) -> bool:
        found = self._live(action.action_id)
        if found is None:
            return False
        self._forget(found)
        return True
