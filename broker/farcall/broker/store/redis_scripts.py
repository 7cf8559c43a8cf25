"""The Lua scripts of the Redis store: each state change that must be atomic across broker replicas.

Each is one round trip; the key and argument layout is written above it. A task
is open (not terminal) while its ``state`` is none of success, failed, cancelled
(``OPEN``, prepended to the scripts that need it); ``done`` is set once, by the
first of result, failure or cancel, so a later one is ignored.

Each user's count of open tasks (``<prefix>user:<id>:open``) goes up in ``CREATE_TASKS`` and
down where ``done`` is set (``CLOSE``), so exactly once per task. The scripts that end tasks
compute that key from the prefix and the task's ``user_id`` (one Redis, not a cluster), so a
caller need not read the tasks first.
"""

OPEN = """
local function open(st)
  return st and st ~= 'success' and st ~= 'failed' and st ~= 'cancelled'
end
"""

CLOSE = """
local function close(k, prefix)
  local uid = redis.call('HGET', k, 'user_id')
  if uid then
    local c = prefix .. 'user:' .. uid .. ':open'
    if redis.call('DECR', c) < 0 then redis.call('SET', c, 0) end
  end
end
"""

# KEYS[1] inflight hash, KEYS[2] queued counter, KEYS[3] live-session key, KEYS[4..] task hashes;
# ARGV[1] endpoint id, ARGV[2] tasks taken off the queue, ARGV[3] session id, then (task id, body)
# pairs. Returns nil (changing nothing) when the session is not the live one.
INFLIGHT_ADD = OPEN + """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return false end
local out = {}
redis.call('DECRBY', KEYS[2], ARGV[2])
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

# KEYS[1] group hash, KEYS[2] group's task list, KEYS[3] queued counter, KEYS[4] inflight hash,
# KEYS[5] live-session key, KEYS[6] the user's open-task counter, KEYS[7] the user's index of
# recent groups (sorted set, scored by last submission), KEYS[8..] task hashes. ARGV: ttl, new
# group ('1'/'0'), its user id, its created_at (this batch's time), queued delta, session id, the
# open-task limit (0: none), number of inflight pairs, the group's id, the groups the index keeps,
# the pairs, the number of fields every task shares and those fields, then per task (in the order
# of KEYS[8..]) its id and its function id. The index is trimmed only when a group is new.
# Returns {-1, open tasks} changing nothing when the batch would pass the limit; else {1, n}
# when the inflight pairs went in flight (the session is the live one), {0, n} when they count
# as queued. One call instead of a pipeline of commands: a single task's round trip is about
# 40% shorter.
CREATE_TASKS = """
local ttl = tonumber(ARGV[1])
local ntasks = #KEYS - 7
local limit = tonumber(ARGV[7])
local current = tonumber(redis.call('GET', KEYS[6]) or '0')
if current < 0 then current = 0 end
if limit > 0 and current + ntasks > limit then return {-1, current} end
redis.call('SET', KEYS[6], current + ntasks)
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'user_id', ARGV[3], 'created_at', ARGV[4])
end
local npairs = tonumber(ARGV[8])
local direct = 0
local i = 11
local pairs_end = i + 2 * npairs - 1
if npairs > 0 and redis.call('GET', KEYS[5]) == ARGV[6] then
  direct = 1
  for a = i, pairs_end, 1000 do
    redis.call('HSET', KEYS[4], unpack(ARGV, a, math.min(a + 999, pairs_end)))
  end
  redis.call('INCRBY', KEYS[3], ARGV[5])
else
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[5]) + npairs)
end
i = pairs_end + 1
local n = tonumber(ARGV[i])
local shared = {unpack(ARGV, i + 1, i + n)}
i = i + n + 1
local ids = {}
for k = 8, #KEYS do
  redis.call('HSET', KEYS[k], 'task_id', ARGV[i], 'function_id', ARGV[i + 1], unpack(shared))
  ids[#ids + 1] = ARGV[i]
  i = i + 2
end
for a = 1, #ids, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ids, a, math.min(a + 999, #ids)))
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[9])
if ARGV[2] == '1' then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. (tonumber(ARGV[4]) - ttl))
  redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -(tonumber(ARGV[10]) + 1))
end
redis.call('EXPIRE', KEYS[7], ttl)
return {direct, current + ntasks}
"""

# KEYS task hashes; ARGV[1] endpoint id (or '' for any), ARGV[2] new state, ARGV[3] error,
# ARGV[4] ttl, ARGV[5] key prefix, ARGV[5 + i] timestamp for KEYS[i]. A failure is final (done,
# expires with the results, leaves the open-task count); returns per task its group id if this
# call changed it, else ''.
TRANSITION = OPEN + CLOSE + """
local out = {}
local ttl = tonumber(ARGV[4])
for i = 1, #KEYS do
  local k = KEYS[i]
  local changed = ''
  if open(redis.call('HGET', k, 'state'))
     and (ARGV[1] == '' or redis.call('HGET', k, 'endpoint_id') == ARGV[1]) then
    if ARGV[2] ~= 'failed' then
      redis.call('HSET', k, 'state', ARGV[2], 't:' .. ARGV[2], ARGV[5 + i])
      changed = redis.call('HGET', k, 'task_group_id')
    elseif redis.call('HSETNX', k, 'done', '1') == 1 then
      redis.call('HSET', k, 'state', 'failed', 't:failed', ARGV[5 + i], 'error', ARGV[3],
                 'completed_at', ARGV[5 + i])
      if ttl > 0 then redis.call('EXPIRE', k, ttl) end
      close(k, ARGV[5])
      changed = redis.call('HGET', k, 'task_group_id')
    end
  end
  out[#out + 1] = changed
end
return out
"""

# KEYS[1..n] task hashes, KEYS[n+1..2n] the in-flight hash of each task's endpoint; ARGV[1]
# only queued ('1'/'0'), ARGV[2] now, ARGV[3] error text, ARGV[4] ttl, ARGV[5] key prefix,
# ARGV[6..] task ids. Returns per task 'cancelled', or the state that stopped it ('' for a task
# that is gone).
CANCEL = OPEN + CLOSE + """
local n = #KEYS / 2
local out = {}
local ttl = tonumber(ARGV[4])
for i = 1, n do
  local k = KEYS[i]
  local st = redis.call('HGET', k, 'state')
  if not open(st) or (ARGV[1] == '1' and st == 'running') then
    out[i] = st or ''
  elseif redis.call('HSETNX', k, 'done', '1') == 1 then
    redis.call('HSET', k, 'state', 'cancelled', 't:cancelled', ARGV[2], 'error', ARGV[3],
               'completed_at', ARGV[2])
    if ttl > 0 then redis.call('EXPIRE', k, ttl) end
    close(k, ARGV[5])
    redis.call('HDEL', KEYS[n + i], ARGV[5 + i])
    out[i] = 'cancelled'
  else
    out[i] = st
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

# KEYS[1] inflight hash, KEYS[2..] task hashes; ARGV[1] endpoint id, ARGV[2] ttl, ARGV[3] now,
# ARGV[4] key prefix, then 7 per result: task id, state, data, error, worker JSON, started_at
# ('' if unknown), attempts JSON ('' if none). Returns per result the task group id if this call
# completed it, else ''.
COMPLETE = CLOSE + """
local out = {}
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  local b = 4 + (i - 2) * 7
  local k = KEYS[i]
  redis.call('HDEL', KEYS[1], ARGV[b + 1])
  if redis.call('HGET', k, 'endpoint_id') == ARGV[1]
     and redis.call('HSETNX', k, 'done', '1') == 1 then
    local st = ARGV[b + 2]
    redis.call('HSET', k, 'state', st, 'data', ARGV[b + 3], 'error', ARGV[b + 4],
               'worker', ARGV[b + 5], 'completed_at', ARGV[3], 't:' .. st, ARGV[3])
    if ARGV[b + 6] ~= '' and redis.call('HEXISTS', k, 't:running') == 0 then
      redis.call('HSET', k, 't:running', ARGV[b + 6])
    end
    if ARGV[b + 7] ~= '' then
      redis.call('HSET', k, 'result_attempts', ARGV[b + 7])
    end
    if ttl > 0 then redis.call('EXPIRE', k, ttl) end
    close(k, ARGV[4])
    out[#out + 1] = redis.call('HGET', k, 'task_group_id')
  else
    out[#out + 1] = ''
  end
end
return out
"""

# KEYS[1] name index (name -> user id), KEYS[2] user hash, KEYS[3] token-hash index, KEYS[4] the
# token's hash, KEYS[5] the user's token ids, KEYS[6] every token id (sorted sets by creation);
# ARGV[1] name, ARGV[2] user id, ARGV[3] token hash, ARGV[4] what the index maps it to, ARGV[5]
# token id, ARGV[6] its created_at, ARGV[7] number of user fields (then name, value pairs), then
# the token's field pairs. Returns 0, changing nothing, when the name is taken.
CREATE_USER = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local n = tonumber(ARGV[7])
redis.call('HSET', KEYS[2], unpack(ARGV, 8, 7 + n))
redis.call('HSET', KEYS[4], unpack(ARGV, 8 + n, #ARGV))
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
redis.call('ZADD', KEYS[6], ARGV[6], ARGV[5])
return 1
"""

# KEYS[1] token hash (record), KEYS[2] token-hash index, KEYS[3] every token id; ARGV[1] token id,
# ARGV[2] the user it must belong to ('' for any), ARGV[3] key prefix. Returns the deleted
# record's fields as a flat list, or an empty one (changing nothing) if there is no such token
# of that user.
REVOKE_TOKEN = """
local rec = redis.call('HGETALL', KEYS[1])
if #rec == 0 then return {} end
local uid = redis.call('HGET', KEYS[1], 'user_id')
if ARGV[2] ~= '' and uid ~= ARGV[2] then return {} end
redis.call('HDEL', KEYS[2], redis.call('HGET', KEYS[1], 'token_hash'))
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', ARGV[3] .. 'user:' .. uid .. ':tokens', ARGV[1])
return rec
"""

# KEYS[1] the function's or endpoint's hash, KEYS[2] its set of user ids it is shared with,
# KEYS[3] (endpoints) the user's set of endpoints shared with them. ARGV[1] '1' share, '0'
# unshare; ARGV[2] user id ('' for none), ARGV[3] the function's or endpoint's id, ARGV[4] '1' to
# set (share) or clear (unshare) its public flag too. Changes nothing if the record is gone, so a
# share racing a delete leaves no stray set behind.
SHARE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local on = ARGV[1] == '1'
if ARGV[2] ~= '' then
  redis.call(on and 'SADD' or 'SREM', KEYS[2], ARGV[2])
  if KEYS[3] then redis.call(on and 'SADD' or 'SREM', KEYS[3], ARGV[3]) end
end
if ARGV[4] == '1' then
  if on then redis.call('HSET', KEYS[1], 'public', '1') else redis.call('HDEL', KEYS[1], 'public') end
end
return 1
"""

# ---- timers (:mod:`.redis_timers`). A timer's hash holds ``state`` and ``next_run`` ('' unless
# active); ``p timers:due`` scores each active timer by its next_run; its runs are a hash run
# number -> run JSON, the latest few kept.

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

# KEYS[1] the timer's hash, KEYS[2] its runs, KEYS[3] the due set. ARGV[1] timer id, ARGV[2] the
# next_run the caller saw (as stored), ARGV[3] the next run after this one ('' for none),
# ARGV[4] stop_after_runs (0: none), ARGV[5] the run's JSON, ARGV[6] runs kept. The compare and
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
return n
"""

# KEYS[1] the timer's hash, KEYS[2] the due set. ARGV[1] timer id, ARGV[2] the states it may
# leave (comma-separated), ARGV[3] its new state, ARGV[4] its next_run ('' for none), ARGV[5] a
# reason ('' for none). Pause, resume and stop: 1 if the timer was in one of those states.
TIMER_SET_STATE = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st or not string.find(',' .. ARGV[2] .. ',', ',' .. st .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'next_run', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[5]) end
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

# KEYS[1] the timer's runs. ARGV[1] run number, ARGV[2] the run's JSON: replaces a run still kept.
TIMER_ATTACH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""
