"""Redis ``TimerStore``: a hash per timer, one sorted set of next runs for every replica's
scheduler, and Lua for each change a replica may race another on.

Keys (``p`` is the prefix): ``p timer:<id>`` hash (the ``TimerRecord`` without its runs:
``schedule`` and ``submitter`` as JSON, ``next_run`` and ``reason`` ``''`` when none);
``p timer:<id>:runs`` hash run number -> ``TimerRun`` JSON (the latest ``TIMER_RUNS_KEPT``);
``p user:<id>:timers`` sorted set of the user's timer ids by creation; ``p timers:due`` sorted
set of active timer ids by next run; ``p timers:unsubmitted`` sorted set of runs
``<timer id>:<number>`` claimed and not attached yet, by claim time. A run is claimed by a
compare and set of ``next_run`` (``TIMER_CLAIM``), so of all the replicas that find a timer due, one fires it.
"""

from __future__ import annotations

import json
from typing import Any

from farcall.broker.records import TimerRecord
from farcall.broker.store.base import TimerStore
from farcall.protocol.common import Versions
from farcall.protocol.timers import TIMER_RUNS_KEPT, TimerRun, TimerSchedule

_RUN_FIELDS = {"at", "task_id", "error"}
"""What a run's JSON holds (its number is its key)."""

# KEYS[1] the user's timers (sorted set by creation), KEYS[2] the timer's hash, KEYS[3] the due
# set. ARGV[1] the user's limit of timers (0: none), ARGV[2] timer id, ARGV[3] its created_at,
# ARGV[4] its next_run ('' for none), ARGV[5..] the hash's field, value pairs. Returns 0,
# changing nothing, when the user has the limit already.
TIMER_CREATE = """
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2]) end
return 1
"""

# KEYS[1] the timer's hash, KEYS[2] its runs, KEYS[3] the due set, KEYS[4] the unsubmitted
# runs. ARGV[1] timer id, ARGV[2] the next_run the caller saw (as stored), ARGV[3] the next run
# after this one ('' for none), ARGV[4] stop_after_runs (0: none), ARGV[5] the run's JSON,
# ARGV[6] runs kept, ARGV[7] the claim's time. The compare and
# set that makes a run fire once across replicas: the run's number, or nil when the timer is no
# longer active and due at ARGV[2] (another replica claimed it, or it was paused or deleted).
TIMER_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active'
    or redis.call('HGET', KEYS[1], 'next_run') ~= ARGV[2] then
  return false
end
local n = redis.call('HINCRBY', KEYS[1], 'run_count', 1)
local limit = tonumber(ARGV[4])
if ARGV[3] == '' or (limit > 0 and n >= limit) then
  redis.call('HSET', KEYS[1], 'state', 'finished', 'next_run', '')
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'next_run', ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
redis.call('HSET', KEYS[2], n, ARGV[5])
redis.call('HDEL', KEYS[2], n - tonumber(ARGV[6]))
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1] .. ':' .. n)
return n
"""

# KEYS[1] the timer's hash, KEYS[2] the due set. ARGV[1] timer id, ARGV[2] the states it may
# leave (comma-separated), ARGV[3] its new state, ARGV[4] its next_run ('' for none), ARGV[5] a
# reason ('' for none; leaving ``paused`` clears the pause's). Pause, resume and stop: 1 if the
# timer was in one of those states.
TIMER_SET_STATE = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st or not string.find(',' .. ARGV[2] .. ',', ',' .. st .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'next_run', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'reason', ARGV[5])
elseif st == 'paused' then
  redis.call('HSET', KEYS[1], 'reason', '')
end
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
return 1
"""

# KEYS[1] the timer's hash, KEYS[2] its runs, KEYS[3] the due set. ARGV[1] timer id, ARGV[2] the
# key prefix (for its user's set of timers). 1 if there was such a timer.
TIMER_DELETE = """
local uid = redis.call('HGET', KEYS[1], 'user_id')
if not uid then return 0 end
redis.call('ZREM', ARGV[2] .. 'user:' .. uid .. ':timers', ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# KEYS[1] the timer's runs, KEYS[2] the unsubmitted runs. ARGV[1] run number, ARGV[2] the run's
# JSON: replaces a run still kept. ARGV[3] the run's member of KEYS[2].
TIMER_ATTACH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('ZREM', KEYS[2], ARGV[3])
"""

# KEYS[1] the unsubmitted runs. ARGV[1] claimed before this, ARGV[2] the new claim time, ARGV[3]
# at most this many, ARGV[4] key prefix. Members of runs whose timer is gone are dropped; returns
# the others' members, each now scored ARGV[2].
TIMER_UNSUBMITTED = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, member in ipairs(found) do
  local timer_id = string.match(member, '^(.*):%d+$')
  if timer_id and redis.call('EXISTS', ARGV[4] .. 'timer:' .. timer_id) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[2], member)
    out[#out + 1] = member
  else
    redis.call('ZREM', KEYS[1], member)
  end
end
return out
"""


class RedisTimers(TimerStore):
    def __init__(self, r: Any, prefix: str) -> None:
        self._r = r
        self._prefix = prefix
        self._create = r.register_script(TIMER_CREATE)
        self._claim = r.register_script(TIMER_CLAIM)
        self._set_state = r.register_script(TIMER_SET_STATE)
        self._delete = r.register_script(TIMER_DELETE)
        self._attach = r.register_script(TIMER_ATTACH)
        self._unsubmitted = r.register_script(TIMER_UNSUBMITTED)

    def _k(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def create(self, timer: TimerRecord, max_timers: int = 0) -> bool:
        fields = {
            "timer_id": timer.timer_id, "user_id": timer.user_id, "name": timer.name,
            "endpoint_id": timer.endpoint_id, "function_id": timer.function_id,
            "args": timer.args,
            "submitter": timer.submitter.model_dump_json() if timer.submitter else "",
            "schedule": timer.schedule.model_dump_json(), "state": timer.state,
            "reason": timer.reason or "", "next_run": _num(timer.next_run),
            "run_count": str(timer.run_count), "created_at": repr(timer.created_at),
        }
        args: list[Any] = [max_timers, timer.timer_id, repr(timer.created_at),
                           fields["next_run"] if timer.state == "active" else ""]
        args += [x for pair in fields.items() for x in pair]
        keys = [self._k("user", timer.user_id, "timers"), self._k("timer", timer.timer_id),
                self._k("timers:due")]
        return bool(await self._create(keys=keys, args=args))

    async def get(self, timer_id: str) -> TimerRecord | None:
        async with self._r.pipeline(transaction=False) as p:
            p.hgetall(self._k("timer", timer_id))
            p.hgetall(self._k("timer", timer_id, "runs"))
            rec, runs = await p.execute()
        return _timer(rec, runs) if rec else None

    async def _get_many(self, timer_ids: list[str]) -> list[TimerRecord]:
        async with self._r.pipeline(transaction=False) as p:
            for t in timer_ids:
                p.hgetall(self._k("timer", t))
            found = await p.execute()
        return [_timer(rec) for rec in found if rec]

    async def by_user(self, user_id: str) -> list[TimerRecord]:
        return await self._get_many(await self._r.zrange(self._k("user", user_id, "timers"), 0, -1))

    async def delete(self, timer_id: str) -> bool:
        return bool(await self._delete(
            keys=[self._k("timer", timer_id), self._k("timer", timer_id, "runs"),
                  self._k("timers:due")],
            args=[timer_id, self._prefix]))

    async def _change(self, timer_id: str, leaving: str, state: str, next_run: float | None,
                      reason: str = "") -> bool:
        return bool(await self._set_state(
            keys=[self._k("timer", timer_id), self._k("timers:due")],
            args=[timer_id, leaving, state, _num(next_run), reason]))

    async def pause(self, timer_id: str, reason: str = "") -> bool:
        return await self._change(timer_id, "active", "paused", None, reason)

    async def resume(self, timer_id: str, next_run: float | None) -> bool:
        return await self._change(
            timer_id, "paused", "active" if next_run is not None else "finished", next_run)

    async def stop(self, timer_id: str, reason: str) -> bool:
        return await self._change(timer_id, "active,paused", "stopped", None, reason)

    async def due(self, at: float, limit: int) -> list[TimerRecord]:
        ids = await self._r.zrangebyscore(self._k("timers:due"), "-inf", repr(at), start=0,
                                          num=limit)
        return await self._get_many(ids) if ids else []

    async def claim(
        self, timer_id: str, due_at: float, next_at: float | None, at: float,
        stop_after_runs: int | None = None,
    ) -> TimerRun | None:
        number = await self._claim(
            keys=[self._k("timer", timer_id), self._k("timer", timer_id, "runs"),
                  self._k("timers:due"), self._k("timers:unsubmitted")],
            args=[timer_id, repr(due_at), _num(next_at), stop_after_runs or 0,
                  _run_json(TimerRun(number=0, at=at)), TIMER_RUNS_KEPT, repr(at)])
        return None if number is None else TimerRun(number=int(number), at=at)

    async def attach(self, timer_id: str, run: TimerRun) -> None:
        await self._attach(keys=[self._k("timer", timer_id, "runs"),
                                 self._k("timers:unsubmitted")],
                           args=[run.number, _run_json(run), f"{timer_id}:{run.number}"])

    async def unsubmitted(self, claimed_before: float, at: float, limit: int
                          ) -> list[tuple[str, int]]:
        found = await self._unsubmitted(keys=[self._k("timers:unsubmitted")],
                                        args=[repr(claimed_before), repr(at), limit, self._prefix])
        return [(timer_id, int(number)) for timer_id, _, number in
                (member.rpartition(":") for member in found)]


def _num(value: float | None) -> str:
    """A time as stored (and compared by ``claim``): ``repr`` of the float, ``''`` for none."""
    return "" if value is None else repr(float(value))


def _run_json(run: TimerRun) -> str:
    return run.model_dump_json(include=_RUN_FIELDS)


def _timer(rec: dict[str, str], runs: dict[str, str] | None = None) -> TimerRecord:
    kept = sorted((int(n), raw) for n, raw in (runs or {}).items())
    return TimerRecord.model_construct(
        timer_id=rec["timer_id"],
        user_id=rec["user_id"],
        name=rec.get("name", ""),
        endpoint_id=rec["endpoint_id"],
        function_id=rec["function_id"],
        args=rec.get("args", ""),
        submitter=Versions.model_validate_json(rec["submitter"]) if rec.get("submitter") else None,
        schedule=TimerSchedule.model_validate_json(rec["schedule"]),
        state=rec["state"],
        reason=rec.get("reason") or None,
        next_run=float(rec["next_run"]) if rec.get("next_run") else None,
        run_count=int(rec.get("run_count", 0)),
        runs=[TimerRun.model_validate({**json.loads(raw), "number": n}) for n, raw in kept],
        created_at=float(rec["created_at"]),
    )
