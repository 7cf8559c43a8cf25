"""Redis ``UnqueuedStore``: batches recorded as waiting, not yet confirmed by the queue.

Keys (``p`` is the prefix): ``p unqueued`` sorted set of batch ids by when they were recorded
(or last claimed); ``p unqueued:<batch id>`` hash ``endpoint_id``, ``body`` (the queue message),
written by ``tasks.CREATE_TASKS`` with the tasks themselves. A claim is one Lua call, so of the
replicas sweeping at once each batch goes to one.
"""

from __future__ import annotations

from farcall.broker.store.base import UnqueuedBatch, UnqueuedStore
from farcall.broker.store.redis.connection import RedisConnection

# KEYS[1] the sorted set; ARGV[1] claim those scored below this, ARGV[2] the new score, ARGV[3]
# at most this many, ARGV[4] key prefix. Returns triples batch id, endpoint id, body; a member
# whose hash expired is dropped.
CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local found = redis.call('HMGET', ARGV[4] .. 'unqueued:' .. id, 'endpoint_id', 'body')
  if found[1] then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = found[1]
    out[#out + 1] = found[2]
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""


class RedisUnqueued(UnqueuedStore):
    def __init__(self, db: RedisConnection) -> None:
        self._db = db
        self._claim = db.r.register_script(CLAIM)

    async def done(self, batch_ids: list[str]) -> None:
        if not batch_ids:
            return
        db = self._db
        async with db.r.pipeline(transaction=False) as p:
            p.zrem(db.k("unqueued"), *batch_ids)
            p.delete(*(db.k("unqueued", b) for b in batch_ids))
            await p.execute()

    async def claim(self, recorded_before: float, at: float, limit: int) -> list[UnqueuedBatch]:
        db = self._db
        found = await self._claim(keys=[db.k("unqueued")],
                                  args=[repr(recorded_before), repr(at), limit, db.prefix])
        return [UnqueuedBatch(found[i], found[i + 1], found[i + 2].encode())
                for i in range(0, len(found), 3)]
