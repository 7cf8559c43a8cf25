"""The Lua scripts of the Redis store: each state change that must be atomic across broker replicas.

Each is one round trip; the key and argument layout is written above it. A task
is open (not terminal) while its ``state`` is none of success, failed, cancelled
(``OPEN``, prepended to the scripts that need it); ``done`` is set once, by the
first of result, failure or cancel, so a later one is ignored.
"""

OPEN = """
local function open(st)
  return st and st ~= 'success' and st ~= 'failed' and st ~= 'cancelled'
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
# KEYS[5] live-session key, KEYS[6..] task hashes. ARGV: ttl, new group ('1'/'0'), its user id,
# its created_at, queued delta, session id, number of inflight pairs, the pairs, the number of
# fields every task shares and those fields, then per task (in the order of KEYS[6..]) its id and
# its function id. The inflight pairs go in flight only while the session is the live one, else
# they count as queued; returns 1 when they went in flight. One call instead of a pipeline of
# commands: a single task's round trip is about 40% shorter.
CREATE_TASKS = """
local ttl = tonumber(ARGV[1])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'user_id', ARGV[3], 'created_at', ARGV[4])
end
local npairs = tonumber(ARGV[7])
local direct = 0
local i = 8
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
for k = 6, #KEYS do
  redis.call('HSET', KEYS[k], 'task_id', ARGV[i], 'function_id', ARGV[i + 1], unpack(shared))
  ids[#ids + 1] = ARGV[i]
  i = i + 2
end
for a = 1, #ids, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ids, a, math.min(a + 999, #ids)))
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return direct
"""

# KEYS task hashes; ARGV[1] endpoint id (or '' for any), ARGV[2] new state, ARGV[3] error,
# ARGV[4] ttl, ARGV[4 + i] timestamp for KEYS[i]. A failure is final (done, expires with the
# results); returns per task its group id if this call changed it, else ''.
TRANSITION = OPEN + """
local out = {}
local ttl = tonumber(ARGV[4])
for i = 1, #KEYS do
  local k = KEYS[i]
  local changed = ''
  if open(redis.call('HGET', k, 'state'))
     and (ARGV[1] == '' or redis.call('HGET', k, 'endpoint_id') == ARGV[1]) then
    if ARGV[2] ~= 'failed' then
      redis.call('HSET', k, 'state', ARGV[2], 't:' .. ARGV[2], ARGV[4 + i])
      changed = redis.call('HGET', k, 'task_group_id')
    elseif redis.call('HSETNX', k, 'done', '1') == 1 then
      redis.call('HSET', k, 'state', 'failed', 't:failed', ARGV[4 + i], 'error', ARGV[3],
                 'completed_at', ARGV[4 + i])
      if ttl > 0 then redis.call('EXPIRE', k, ttl) end
      changed = redis.call('HGET', k, 'task_group_id')
    end
  end
  out[#out + 1] = changed
end
return out
"""

# KEYS[1..n] task hashes, KEYS[n+1..2n] the in-flight hash of each task's endpoint; ARGV[1]
# only queued ('1'/'0'), ARGV[2] now, ARGV[3] error text, ARGV[4] ttl, ARGV[5..] task ids.
# Returns per task 'cancelled', or the state that stopped it ('' for a task that is gone).
CANCEL = OPEN + """
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
    redis.call('HDEL', KEYS[n + i], ARGV[4 + i])
    out[i] = 'cancelled'
  else
    out[i] = st
  end
end
return out
"""

# KEYS[1] inflight hash, KEYS[2..] task hashes of the tasks the agent no longer holds; ARGV[1]
# endpoint id, ARGV[2] crashes at which a task fails, ARGV[3] now, ARGV[4] ttl, ARGV[5] the
# attempt text for a lost session, ARGV[6] for an agent crash, ARGV[7] the failure text, then per
# task its id and '1' if the agent crashed running it. Returns per task 'again', 'dropped' or
# 'failed:<task group id>'; failed and dropped tasks leave the in-flight set, the others stay
# until the caller has queued them again.
RECONCILE = OPEN + """
local out = {}
local max = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
for i = 2, #KEYS do
  local k = KEYS[i]
  local id = ARGV[6 + 2 * (i - 1)]
  local crashed = ARGV[7 + 2 * (i - 1)] == '1'
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
# then 7 per result: task id, state, data, error, worker JSON, started_at ('' if unknown),
# attempts JSON ('' if none). Returns per result the task group id if this call completed it,
# else ''.
COMPLETE = """
local out = {}
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  local b = 3 + (i - 2) * 7
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
    out[#out + 1] = redis.call('HGET', k, 'task_group_id')
  else
    out[#out + 1] = ''
  end
end
return out
"""
