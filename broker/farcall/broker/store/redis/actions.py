"""Redis ``ActionStore``: an action is one JSON string, with its request id beside it.

Keys (``p`` is the prefix): ``p ap:<action id>`` the ``ActionRecord`` JSON; ``p ap:req:<user
id>:<sha256 of the request id>`` the action id (a request id is the client's text, of any
length; its hash keeps the key short). Both expire together (``PX``). Creating is one Lua
call, so two replicas given the same request at once make one action.
"""

from __future__ import annotations

import hashlib
from typing import Any

from farcall.broker.records import ActionRecord
from farcall.broker.store.base import ActionStore

CREATE = """
local existing = redis.call('GET', KEYS[1])
if existing then
  local found = redis.call('GET', ARGV[4] .. existing)
  if found then return found end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return false
"""
"""KEYS: request key, action key. ARGV: action id, record JSON, ttl (ms), action key prefix.
Returns the record already stored under the request id, or nothing when it stored this one."""


class RedisActions(ActionStore):
    def __init__(self, r: Any, prefix: str) -> None:
        self._r = r
        self._prefix = prefix
        self._create = r.register_script(CREATE)

    def _key(self, action_id: str) -> str:
        return f"{self._prefix}ap:{action_id}"

    def _request_key(self, action: ActionRecord) -> str:
        digest = hashlib.sha256(action.request_id.encode()).hexdigest()
        return f"{self._prefix}ap:req:{action.user_id}:{digest}"

    async def create(self, action: ActionRecord, ttl: float) -> ActionRecord:
        found = await self._create(
            keys=[self._request_key(action), self._key(action.action_id)],
            args=[action.action_id, action.model_dump_json(), _ms(ttl), self._key("")])
        return action if not found else ActionRecord.model_validate_json(found)

    async def get(self, action_id: str) -> ActionRecord | None:
        found = await self._r.get(self._key(action_id))
        return None if found is None else ActionRecord.model_validate_json(found)

    async def update(self, action: ActionRecord, ttl: float) -> bool:
        async with self._r.pipeline(transaction=True) as p:
            p.set(self._key(action.action_id), action.model_dump_json(), px=_ms(ttl), xx=True)
            p.pexpire(self._request_key(action), _ms(ttl))
            replaced, _ = await p.execute()
        return bool(replaced)

    async def release(self, action: ActionRecord) -> bool:
        async with self._r.pipeline(transaction=True) as p:
            p.delete(self._key(action.action_id))
            p.delete(self._request_key(action))
            deleted, _ = await p.execute()
        return bool(deleted)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
