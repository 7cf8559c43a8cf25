"""Redis ``BlobStore``: a blob is its chunks, one key each, and a meta key written last.

Keys (``p`` is the prefix): ``p blob:<id>:<i>`` the i-th chunk (bytes); ``p blob:<id>`` hash
``size``, ``chunks``, written with every chunk's expiry renewed in one transaction once all are
stored, so a half-written blob is never visible and its chunks outlive nothing; every key
expires. ``p blob-secret`` the grant secret (set once, ``SET NX``). Its own connection pool,
without decoding: blobs are bytes, the records' client decodes to ``str``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from farcall.broker.store.base import Blob, BlobMissing, BlobStore, write_behind

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 50
"""Redis connections a broker process uses for blobs (a transfer uses one or two at a time)."""
POOL_WAIT = 5.0
COMMAND_TIMEOUT = 30.0
"""Seconds one command may take: a 4 MiB chunk over a slow link takes far less."""


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

    def _meta(self, blob_id: str) -> str:
        return f"{self._prefix}blob:{blob_id}"

    def _chunk(self, blob_id: str, i: int) -> str:
        return f"{self._prefix}blob:{blob_id}:{i}"

    async def write(self, blob_id: str, chunks: AsyncIterable[bytes], ttl: float) -> int:
        ms = _ms(ttl)
        stored = 0

        async def put(i: int, chunk: bytes) -> None:
            nonlocal stored
            stored = i + 1  # counted before the SET: a cancelled one may still have landed
            await self._r.set(self._chunk(blob_id, i), chunk, px=ms)

        try:
            count, size = await write_behind(chunks, put)
            async with self._r.pipeline(transaction=True) as p:
                for i in range(count):
                    p.pexpire(self._chunk(blob_id, i), ms)
                p.hset(self._meta(blob_id), mapping={"size": size, "chunks": count})
                p.pexpire(self._meta(blob_id), ms)
                await p.execute()
        except BaseException:
            if stored:  # they would expire anyway; this frees the memory now
                with contextlib.suppress(Exception):
                    await self._r.delete(*(self._chunk(blob_id, i) for i in range(stored)))
            raise
        return size

    async def open(self, blob_id: str) -> Blob | None:
        size, count = await self._r.hmget(self._meta(blob_id), "size", "chunks")
        if size is None or count is None:
            return None
        return Blob(int(size), self._chunks(blob_id, int(count)))

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

    async def touch(self, blob_ids: list[str], ttl: float) -> None:
        if not blob_ids:
            return
        async with self._r.pipeline(transaction=False) as p:
            for blob_id in blob_ids:
                p.hget(self._meta(blob_id), "chunks")
            counts = await p.execute()
        ms = _ms(ttl)
        async with self._r.pipeline(transaction=True) as p:
            for blob_id, count in zip(blob_ids, counts, strict=True):
                if count is None:
                    continue
                for i in range(int(count)):
                    p.pexpire(self._chunk(blob_id, i), ms)
                p.pexpire(self._meta(blob_id), ms)
            await p.execute()

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


def _ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))
