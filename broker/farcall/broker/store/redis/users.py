"""Redis ``UserStore``: users, their unique names, and the tokens of users and endpoints.

Keys (``p`` is the prefix): ``p tokens`` hash sha256 -> ``user:<user id>:<token id>`` /
``endpoint:<id>`` (an endpoint's is written by ``endpoints``; a ``user:<id>`` written before
tokens had ids still resolves, with no token id); ``p token:<id>`` hash (the TokenRecord);
``p tokens:all`` and ``p user:<id>:tokens`` sorted sets of token ids by creation;
``p users:names`` hash name -> user id (what keeps names unique); ``p user:<id>`` (with
``disabled`` ``1`` while an administrator disabled the user). Creating a user, adding and
revoking a token are Lua calls, so two replicas cannot both take one name nor pass the token cap;
resolving one is too, so a disabled owner's tokens and endpoint credentials fail in the same
round trip.
"""

from __future__ import annotations

from typing import Any

from farcall.broker.records import TokenRecord, UserRecord
from farcall.broker.store.base import Principal, UserStore
from farcall.broker.store.redis.connection import RedisConnection, flat

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


# KEYS[1] the token's hash, KEYS[2] token-hash index, KEYS[3] the user's token ids, KEYS[4] every
# token id; ARGV[1] token hash, ARGV[2] what the index maps it to, ARGV[3] token id, ARGV[4]
# created_at, ARGV[5] the most tokens the user may hold (0: no limit), then the token's field
# pairs. Returns 0, changing nothing, when the user holds that many already.
ADD_TOKEN = """
local limit = tonumber(ARGV[5])
if limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6, #ARGV))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
return 1
"""

# KEYS[1] token-hash index; ARGV[1] token hash, ARGV[2] key prefix. What the index maps the hash
# to, or nil for an unknown token and for one whose user (or, for an endpoint's credential, the
# endpoint's owner) is disabled.
RESOLVE_TOKEN = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
local kind, ident = string.match(v, '^(%a+):([^:]+)')
local owner = ident
if kind == 'endpoint' then owner = redis.call('HGET', ARGV[2] .. 'ep:' .. ident, 'user_id') end
if owner and redis.call('HGET', ARGV[2] .. 'user:' .. owner, 'disabled') == '1' then
  return false
end
return v
"""


class RedisUsers(UserStore):
    def __init__(self, db: RedisConnection) -> None:
        self._db = db
        self._create_user = db.r.register_script(CREATE_USER)
        self._revoke_token = db.r.register_script(REVOKE_TOKEN)
        self._add_token = db.r.register_script(ADD_TOKEN)
        self._resolve_token = db.r.register_script(RESOLVE_TOKEN)
        self._set_if_exists = db.r.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
            "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1")

    async def create(self, user: UserRecord, token: TokenRecord) -> bool:
        db = self._db
        fields = _pairs(user.model_dump(exclude={"disabled"}))
        keys = [db.k("users:names"), db.k("user", user.user_id), db.k("tokens"),
                db.k("token", token.token_id), db.k("user", user.user_id, "tokens"),
                db.k("tokens:all")]
        args: list[Any] = [user.name, user.user_id, token.token_hash, _token_value(token),
                           token.token_id, repr(token.created_at), len(fields), *fields,
                           *_pairs(token.model_dump())]
        return bool(await self._create_user(keys=keys, args=args))

    async def get(self, user_id: str) -> UserRecord | None:
        return (await self.get_many([user_id])).get(user_id)

    async def get_many(self, user_ids: list[str]) -> dict[str, UserRecord]:
        async with self._db.r.pipeline(transaction=False) as p:
            for u in user_ids:
                p.hgetall(self._db.k("user", u))
            found = await p.execute()
        return {u: UserRecord.model_validate(rec)
                for u, rec in zip(user_ids, found, strict=True) if rec}

    async def by_name(self, name: str) -> UserRecord | None:
        user_id = await self._db.r.hget(self._db.k("users:names"), name)
        return None if user_id is None else await self.get(user_id)

    async def all(self) -> list[UserRecord]:
        names = await self._db.r.hgetall(self._db.k("users:names"))
        found = await self.get_many(list(names.values()))
        return [found[names[n]] for n in sorted(names) if names[n] in found]

    async def add_token(self, token: TokenRecord, max_tokens: int = 0) -> bool:
        db = self._db
        keys = [db.k("token", token.token_id), db.k("tokens"), db.k("user", token.user_id, "tokens"),
                db.k("tokens:all")]
        args: list[Any] = [token.token_hash, _token_value(token), token.token_id,
                           repr(token.created_at), max_tokens, *_pairs(token.model_dump())]
        return bool(await self._add_token(keys=keys, args=args))

    async def token_count(self, user_id: str) -> int:
        return int(await self._db.r.zcard(self._db.k("user", user_id, "tokens")))

    async def set_disabled(self, user_id: str, disabled: bool) -> bool:
        return bool(await self._set_if_exists(keys=[self._db.k("user", user_id)],
                                              args=["disabled", "1" if disabled else "0"]))

    async def list_tokens(self, user_id: str | None = None) -> list[TokenRecord]:
        db = self._db
        index = db.k("tokens:all") if user_id is None else db.k("user", user_id, "tokens")
        token_ids = await db.r.zrange(index, 0, -1)
        async with db.r.pipeline(transaction=False) as p:
            for t in token_ids:
                p.hgetall(db.k("token", t))
            found = await p.execute()
        return [TokenRecord.model_validate(rec) for rec in found if rec]

    async def revoke_token(self, token_id: str, user_id: str | None = None) -> TokenRecord | None:
        db = self._db
        flat_record = await self._revoke_token(
            keys=[db.k("token", token_id), db.k("tokens"), db.k("tokens:all")],
            args=[token_id, user_id or "", db.prefix])
        if not flat_record:
            return None
        return TokenRecord.model_validate(
            dict(zip(flat_record[::2], flat_record[1::2], strict=True)))

    async def resolve_token(self, token_hash: str) -> Principal | None:
        value = await self._resolve_token(keys=[self._db.k("tokens")],
                                          args=[token_hash, self._db.prefix])
        if not value:
            return None
        kind, _, ident = value.partition(":")
        if kind == "endpoint":
            return Principal("endpoint", ident, token_hash)
        user_id, _, token_id = ident.partition(":")
        return Principal("user", user_id, token_hash, token_id)


def _pairs(record: dict[str, Any]) -> list[str]:
    """A record's fields as the flat name, value list a Lua ``HSET`` takes."""
    return [x for pair in flat(record).items() for x in pair]


def _token_value(token: TokenRecord) -> str:
    """What ``p tokens`` maps a user token's hash to."""
    return f"user:{token.user_id}:{token.token_id}"
