"""Redis ``InflightStore``: per endpoint, one hash of the tasks a channel session took.

Keys (``p`` is the prefix): ``p ep:<id>:inflight`` hash task id -> TaskMessage JSON; it reads
``p ep:<id>:live`` (``endpoints``) and the tasks' hashes (``tasks``). Adding and reconciling are
Lua calls, so only the live session adds and a task ends once however many replicas race.
"""

from __future__ import annotations

from typing import Any

from farcall.broker.store.base import (
    CRASH_ATTEMPT,
    LOST_ATTEMPT,
    InflightStore,
    Reconciled,
    crash_failure,
)
from farcall.broker.store.redis.connection import RedisConnection
from farcall.broker.store.redis.scripts import CLOSE, OPEN
from farcall.protocol.common import TaskState
from farcall.protocol.stream import TaskResult

# KEYS[1] inflight hash, KEYS[2] queued counter, KEYS[3] live-session key, KEYS[4..] task hashes;
# ARGV[1] endpoint id, ARGV[2] tasks taken off the queue, ARGV[3] session id, then (task id, body)
# pairs. Returns nil (changing nothing) when the session is not the live one. The count stays at
# least 0: a batch queued twice (its broker died between queueing it and saying so, and the
# sweep queued it again) is taken twice.
INFLIGHT_ADD = OPEN + """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return false end
local out = {}
if redis.call('DECRBY', KEYS[2], ARGV[2]) < 0 then redis.call('SET', KEYS[2], 0) end
for i = 4, #KEYS do
  local id = ARGV[2 * i - 4]
  local st = redis.call('HGET', KEYS[i], 'state')
  if open(st) and redis.call('HGET', KEYS[i], 'endpoint_id') == ARGV[1] then
    redis.call('HSET', KEYS[1], id, ARGV[2 * i - 3])
    out[#out + 1] = id
  end
end
return out
"""

# KEYS[1] inflight hash, KEYS[2..] task hashes of the tasks the agent no longer holds; ARGV[1]
# endpoint id, ARGV[2] crashes at which a task fails, ARGV[3] now, ARGV[4] ttl, ARGV[5] the
# attempt text for a lost session, ARGV[6] for an agent crash, ARGV[7] the failure text, ARGV[8]
# key prefix, then per task its id and '1' if the agent crashed running it. Returns per task
# 'again', 'dropped' or 'failed:<task group id>'; failed and dropped tasks leave the in-flight
# set, the others stay until the caller has queued them again.
RECONCILE = OPEN + CLOSE + """
local out = {}
local max = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
for i = 2, #KEYS do
  local k = KEYS[i]
  local id = ARGV[7 + 2 * (i - 1)]
  local crashed = ARGV[8 + 2 * (i - 1)] == '1'
  if not open(redis.call('HGET', k, 'state'))
     or redis.call('HGET', k, 'endpoint_id') ~= ARGV[1] then
    redis.call('HDEL', KEYS[1], id)
    out[#out + 1] = 'dropped'
  else
    local raw = redis.call('HGET', k, 'attempts')
    local attempts = raw and cjson.decode(raw) or {}
    attempts[#attempts + 1] = {at = tonumber(ARGV[3]), error = crashed and ARGV[6] or ARGV[5]}
    redis.call('HSET', k, 'attempts', cjson.encode(attempts))
    local crashes = 0
    if crashed then crashes = redis.call('HINCRBY', k, 'crashes', 1) end
    if crashed and crashes >= max and redis.call('HSETNX', k, 'done', '1') == 1 then
      redis.call('HSET', k, 'state', 'failed', 't:failed', ARGV[3], 'error', ARGV[7],
                 'completed_at', ARGV[3])
      if ttl > 0 then redis.call('EXPIRE', k, ttl) end
      close(k, ARGV[8])
      redis.call('HDEL', KEYS[1], id)
      out[#out + 1] = 'failed:' .. redis.call('HGET', k, 'task_group_id')
    else
      out[#out + 1] = 'again'
    end
  end
end
return out
"""


class RedisInflight(InflightStore):
    def __init__(self, db: RedisConnection) -> None:
        self._db = db
        self._add = db.r.register_script(INFLIGHT_ADD)
        self._reconcile = db.r.register_script(RECONCILE)

    async def add(
        self, endpoint_id: str, session_id: str, tasks: dict[str, str], taken: int
    ) -> list[str] | None:
        db = self._db
        keys = [db.k("ep", endpoint_id, "inflight"), db.k("ep", endpoint_id, "queued"),
                db.k("ep", endpoint_id, "live")]
        keys += [db.k("task", t) for t in tasks]
        args: list[str] = [endpoint_id, str(taken), session_id]
        for task_id, body in tasks.items():
            args += [task_id, body]
        accepted = await self._add(keys=keys, args=args)
        return None if accepted is None else list(accepted)

    async def reconcile(
        self, endpoint_id: str, held: set[str], crashed: set[str], max_losses: int, at: float
    ) -> Reconciled:
        db = self._db
        inflight = await self.get(endpoint_id)
        lost = [t for t in inflight if t not in held]
        if not lost:
            return Reconciled({}, [], 0)
        keys = [db.k("ep", endpoint_id, "inflight")] + [db.k("task", t) for t in lost]
        failure = crash_failure(max_losses)
        args: list[Any] = [endpoint_id, max_losses, repr(at), db.result_ttl, LOST_ATTEMPT,
                           CRASH_ATTEMPT, failure, db.prefix]
        for t in lost:
            args += [t, "1" if t in crashed else "0"]
        outcome = await self._reconcile(keys=keys, args=args)
        again: dict[str, str] = {}
        failed: list[tuple[str, TaskResult]] = []
        dropped = 0
        for t, what in zip(lost, outcome, strict=True):
            if what == "again":
                again[t] = inflight[t]
            elif what == "dropped":
                dropped += 1
            else:
                failed.append((what.partition(":")[2],
                               TaskResult.ended_by_broker(t, TaskState.FAILED, failure, at)))
        return Reconciled(again, failed, dropped)

    async def get(self, endpoint_id: str) -> dict[str, str]:
        return await self._db.r.hgetall(self._db.k("ep", endpoint_id, "inflight"))

    async def task(self, endpoint_id: str, task_id: str) -> str | None:
        found: str | None = await self._db.r.hget(self._db.k("ep", endpoint_id, "inflight"), task_id)
        return found

    async def remove(self, endpoint_id: str, task_ids: list[str]) -> None:
        if task_ids:
            await self._db.r.hdel(self._db.k("ep", endpoint_id, "inflight"), *task_ids)
