"""Redis ``BlobStore``: a blob is its chunks, one key each, and a meta key written last.

Keys (``p`` is the prefix): ``p blob:<id>:<i>`` the i-th chunk (bytes); ``p blob:<id>`` hash
``size``, ``chunks``, ``owner``, written with every chunk's expiry renewed in one transaction
once all are stored, so a half-written blob is never visible and its chunks outlive nothing;
every key expires. ``p blob-secret`` the grant secret (set once, ``SET NX``).

The quota's bookkeeping, per owner: ``p blobs-of:<owner>`` sorted set of blob ids scored by
when each expires (ms), ``p blobs-of:<owner>:sizes`` hash of their sizes and
``p blobs-of:<owner>:total`` their sum. Redis expires blob keys silently, so the script that
checks the quota (``RESERVE``) first takes the expired ids out of the sum; a blob written,
touched or deleted updates its entry. The three keys expire when the longest-lived blob would.
Its own connection pool, without decoding: blobs are bytes, the records' client decodes to
``str``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from farcall.broker.store.base import Blob, BlobMissing, BlobStore, OverBlobQuota, write_behind

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 50
"""Redis connections a broker process uses for blobs (a transfer uses one or two at a time)."""
POOL_WAIT = 5.0
COMMAND_TIMEOUT = 30.0
"""Seconds one command may take: a 4 MiB chunk over a slow link takes far less."""


PRUNE_AT_ONCE = 1000
"""Most expired entries one quota check takes out of an owner's sum (the next takes more)."""
KEEP_MARGIN = 60.0
"""Seconds an owner's bookkeeping outlives the blob that expires last."""

_PRUNE = f"""
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, {PRUNE_AT_ONCE})
if #gone > 0 then
  local freed = 0
  for _, id in ipairs(gone) do
    freed = freed + tonumber(redis.call('HGET', KEYS[2], id) or '0')
  end
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('DECRBY', KEYS[3], freed)
end
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
"""

RESERVE = _PRUNE + """
local size, quota = tonumber(ARGV[3]), tonumber(ARGV[5])
if ARGV[2] == '' then return {1, used} end
if quota > 0 and used + size > quota then return {0, used} end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], size)
redis.call('INCRBY', KEYS[3], size)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
return {1, used + size}
"""
"""Prune the owner's expired blobs (KEYS: set, sizes, total; ARGV: now ms), then count blob
ARGV[2] of ARGV[3] bytes expiring at ARGV[4] unless that passes quota ARGV[5]; keys kept
ARGV[6] ms. ``{1 or 0 (refused), bytes used}``; an empty blob id only prunes."""

RELEASE = """
local freed = 0
for _, id in ipairs(ARGV) do
  local size = redis.call('HGET', KEYS[2], id)
  if size then
    freed = freed + tonumber(size)
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[1], id)
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
return freed
"""
"""Stop counting blobs ARGV against their owner (KEYS: set, sizes, total)."""


class RedisBlobs(BlobStore):
    def __init__(self, url: str, prefix: str = "farcall:") -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
            socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=POOL_WAIT)
        # Any: redis-py's annotations do not say which commands answer bytes.
        self._r: Any = aioredis.Redis(connection_pool=pool,
                                      retry=Retry(ExponentialBackoff(cap=0.5), 2))
        self._prefix = prefix
        self._secret: bytes | None = None
        self._reserve = self._r.register_script(RESERVE)
        self._release = self._r.register_script(RELEASE)

    def _ledger(self, owner: str) -> list[str]:
        base = f"{self._prefix}blobs-of:{owner}"
        return [base, f"{base}:sizes", f"{base}:total"]

    def _meta(self, blob_id: str) -> str:
        return f"{self._prefix}blob:{blob_id}"

    def _chunk(self, blob_id: str, i: int) -> str:
        return f"{self._prefix}blob:{blob_id}:{i}"

    async def write(self, blob_id: str, chunks: AsyncIterable[bytes], ttl: float,
                    owner: str = "", size: int = 0, quota: int = 0) -> int:
        ms = _ms(ttl)
        stored = 0
        if owner:
            now = _now_ms()
            allowed, used = await self._reserve(keys=self._ledger(owner), args=[
                now, blob_id, size, now + ms, quota, ms + _ms(KEEP_MARGIN)])
            if not allowed:
                raise OverBlobQuota(int(used), size, quota)

        async def put(i: int, chunk: bytes) -> None:
            nonlocal stored
            stored = i + 1  # counted before the SET: a cancelled one may still have landed
            await self._r.set(self._chunk(blob_id, i), chunk, px=ms)

        try:
            count, written = await write_behind(chunks, put)
            async with self._r.pipeline(transaction=True) as p:
                for i in range(count):
                    p.pexpire(self._chunk(blob_id, i), ms)
                p.hset(self._meta(blob_id),
                       mapping={"size": written, "chunks": count, "owner": owner})
                p.pexpire(self._meta(blob_id), ms)
                if owner:  # it expires from now, not from when the upload began
                    p.zadd(self._ledger(owner)[0], {blob_id: _now_ms() + ms}, xx=True)
                await p.execute()
        except BaseException:
            with contextlib.suppress(Exception):
                if stored:  # they would expire anyway; this frees the memory now
                    await self._r.delete(*(self._chunk(blob_id, i) for i in range(stored)))
                if owner:
                    await self._release(keys=self._ledger(owner), args=[blob_id])
            raise
        return written

    async def open(self, blob_id: str) -> Blob | None:
        size, count, owner = await self._r.hmget(self._meta(blob_id), "size", "chunks", "owner")
        if size is None or count is None:
            return None
        return Blob(int(size), self._chunks(blob_id, int(count)), (owner or b"").decode())

    async def _chunks(self, blob_id: str, count: int) -> AsyncIterator[bytes]:
        """The chunks in order, the next one fetched while the caller sends this one."""
        ahead: asyncio.Future[bytes | None] | None = None
        try:
            for i in range(count):
                current = ahead or asyncio.ensure_future(self._r.get(self._chunk(blob_id, i)))
                ahead = (asyncio.ensure_future(self._r.get(self._chunk(blob_id, i + 1)))
                         if i + 1 < count else None)
                chunk = await current
                if chunk is None:
                    raise BlobMissing(f"blob {blob_id} expired while it was being read")
                yield chunk
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await ahead

    async def _metas(self, blob_ids: list[str]) -> list[tuple[int, str] | None]:
        """``(chunk count, owner)`` of each blob, None for those unknown or expired."""
        async with self._r.pipeline(transaction=False) as p:
            for blob_id in blob_ids:
                p.hmget(self._meta(blob_id), "chunks", "owner")
            found = await p.execute()
        return [None if count is None else (int(count), (owner or b"").decode())
                for count, owner in found]

    async def touch(self, blob_ids: list[str], ttl: float) -> None:
        if not blob_ids:
            return
        metas = await self._metas(blob_ids)
        ms = _ms(ttl)
        expires = _now_ms() + ms
        async with self._r.pipeline(transaction=True) as p:
            for blob_id, meta in zip(blob_ids, metas, strict=True):
                if meta is None:
                    continue
                count, owner = meta
                for i in range(count):
                    p.pexpire(self._chunk(blob_id, i), ms)
                p.pexpire(self._meta(blob_id), ms)
                if owner:
                    ledger = self._ledger(owner)
                    p.zadd(ledger[0], {blob_id: expires}, xx=True)
                    for key in ledger:
                        p.pexpire(key, ms + _ms(KEEP_MARGIN))
            await p.execute()

    async def delete(self, blob_ids: list[str]) -> None:
        if not blob_ids:
            return
        metas = await self._metas(blob_ids)
        by_owner: dict[str, list[str]] = {}
        keys = []
        for blob_id, meta in zip(blob_ids, metas, strict=True):
            if meta is None:
                continue
            count, owner = meta
            keys += [self._meta(blob_id), *(self._chunk(blob_id, i) for i in range(count))]
            if owner:
                by_owner.setdefault(owner, []).append(blob_id)
        if keys:
            await self._r.delete(*keys)
        for owner, ids in by_owner.items():
            await self._release(keys=self._ledger(owner), args=ids)

    async def usage(self, owner: str) -> int:
        _, used = await self._reserve(keys=self._ledger(owner),
                                      args=[_now_ms(), "", 0, 0, 0, 0])
        return int(used)

    async def secret(self) -> bytes:
        if self._secret is None:
            key = f"{self._prefix}blob-secret"
            found = None
            while found is None:  # only a Redis wiped between the two commands loops again
                await self._r.set(key, secrets.token_bytes(32), nx=True)
                found = await self._r.get(key)
            self._secret = bytes(found)
        return self._secret

    async def start(self) -> None:
        await self._r.ping()

    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))
