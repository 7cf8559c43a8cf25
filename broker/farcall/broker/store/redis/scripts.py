"""Lua that more than one part of the Redis store runs; each other script sits beside the part
that runs it (``tasks``, ``inflight``, ``users``, ``timers``, ``actions``).

A task is open (not terminal) while its ``state`` is none of success, failed, cancelled
(``OPEN``, prepended to the scripts of ``tasks`` and ``inflight`` that need it); ``done`` is set
once, by the first of result, failure or cancel, so a later one is ignored.

Each user's count of open tasks (``<prefix>user:<id>:open``) goes up in ``tasks.CREATE_TASKS``
and down where ``done`` is set (``CLOSE``), so exactly once per task. The scripts that end tasks
compute that key from the prefix and the task's ``user_id`` (one Redis, not a cluster), so a
caller need not read the tasks first. The ids of those open tasks (``<prefix>user:<id>:open_ids``,
a set) follow the same two places, so a user's open tasks are found without a scan (an unshare,
a disabled user).
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
    redis.call('SREM', c .. '_ids', redis.call('HGET', k, 'task_id'))
  end
end
"""

# KEYS[1] the endpoint's hash, KEYS[2] the token hash -> principal map. ARGV[1] the new
# credential's hash, ARGV[2] the principal ('endpoint:<id>'). Swaps the endpoint's credential in
# one step (the old one stops resolving as the new one starts); returns the old hash, or nil
# (changing nothing) when the endpoint is gone.
ROTATE_CREDENTIAL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local old = redis.call('HGET', KEYS[1], 'credential_hash') or ''
if old ~= '' then redis.call('HDEL', KEYS[2], old) end
redis.call('HSET', KEYS[1], 'credential_hash', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return old
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
