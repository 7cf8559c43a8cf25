"""The ``BlobStore`` contract, run against memory, the real Redis and a real directory (``files``)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from farcall.broker.services import make_blobs
from farcall.broker.settings import Settings
from farcall.broker.store import files
from farcall.broker.store.base import BlobStore
from farcall.broker.store.files import FileBlobs
from farcall.broker.store.memory.blobs import MemoryBlobs
from farcall.broker.store.redis.blobs import RedisBlobs
from harness.services import REDIS_URL, drop_redis_prefix, redis_keys

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@dataclass
class Backend:
    """A blob store under test, what it leaves behind, and how to open a second one on the
    same backing service (what another broker replica would do)."""

    kind: str
    blobs: BlobStore
    leftovers: Callable[[], int]
    """Stored things (keys, files, entries) other than the secret."""
    another: Callable[[], Awaitable[BlobStore]]


@pytest.fixture(params=["memory", "redis", "files"])
async def backend(request: pytest.FixtureRequest, real_prefix: str,
                  tmp_path: Path) -> AsyncIterator[Backend]:
    opened: list[BlobStore] = []

    async def start(store: BlobStore) -> BlobStore:
        await store.start()
        opened.append(store)
        return store

    if request.param == "memory":
        memory = MemoryBlobs()
        yield Backend("memory", memory, lambda: len(memory), lambda: start(MemoryBlobs()))
    elif request.param == "redis":
        request.getfixturevalue("services")
        prefix = f"{real_prefix}:"

        def keys() -> int:
            return redis_keys(prefix) - redis_keys(f"{prefix}blob-secret")

        try:
            yield Backend("redis", await start(RedisBlobs(REDIS_URL, prefix)), keys,
                          lambda: start(RedisBlobs(REDIS_URL, prefix)))
        finally:
            drop_redis_prefix(prefix)
    else:
        directory = tmp_path / "blobs"

        def stored_files() -> int:
            return sum(1 for name in os.listdir(directory) if name != files.SECRET)

        yield Backend("files", await start(FileBlobs(directory)), stored_files,
                      lambda: start(FileBlobs(directory)))
    for store in opened:
        await store.close()


def _id() -> str:
    return secrets.token_urlsafe(24)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _read(blobs: BlobStore, blob_id: str) -> bytes | None:
    blob = await blobs.open(blob_id)
    if blob is None:
        return None
    data = b"".join([chunk async for chunk in blob.chunks])
    assert len(data) == blob.size, "a blob's bytes must add up to its size"
    return data


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


async def test_a_blob_written_in_chunks_reads_back_whole(backend: Backend) -> None:
    parts = [os.urandom(3 * MiB), b"", os.urandom(5), os.urandom(4 * MiB + 17)]
    blob_id = _id()
    assert await backend.blobs.write(blob_id, _chunks(*parts), 60) == sum(map(len, parts))
    assert await _read(backend.blobs, blob_id) == b"".join(parts)
    assert await _read(backend.blobs, blob_id) == b"".join(parts), "reading does not consume it"
    if backend.kind != "memory":  # in-process blobs are this process's only
        other = await backend.another()
        assert await _read(other, blob_id) == b"".join(parts), "another replica reads it too"
    assert await _read(backend.blobs, _id()) is None
    empty = _id()
    assert await backend.blobs.write(empty, _chunks(), 60) == 0
    assert await _read(backend.blobs, empty) == b""


async def test_a_blob_is_invisible_until_written_and_a_failed_write_leaves_nothing(
    backend: Backend,
) -> None:
    blob_id = _id()
    halfway, go_on = asyncio.Event(), asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield os.urandom(MiB)
        halfway.set()
        await go_on.wait()
        yield b"end"

    writing = asyncio.create_task(backend.blobs.write(blob_id, slow(), 60))
    await halfway.wait()
    await asyncio.sleep(0)  # let the first chunk's store begin
    assert await backend.blobs.open(blob_id) is None, "a half-written blob must be invisible"
    go_on.set()
    assert await writing == MiB + 3
    assert await backend.blobs.open(blob_id) is not None

    before = backend.leftovers()

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(MiB)
        yield os.urandom(MiB)
        raise ConnectionResetError("the client went away")

    failed = _id()
    with pytest.raises(ConnectionResetError):
        await backend.blobs.write(failed, broken(), 60)
    assert await backend.blobs.open(failed) is None
    assert backend.leftovers() == before, "a failed write must not leave chunks or files"


async def test_blobs_expire_and_touch_renews_them(backend: Backend) -> None:
    kept, dropped = _id(), _id()
    for blob_id in (kept, dropped):
        await backend.blobs.write(blob_id, _chunks(b"x" * 100, b"y" * 100), 0.5)
    assert await backend.blobs.open(dropped) is not None
    await backend.blobs.touch([kept, _id()], 60)  # an unknown id is ignored

    async def gone() -> bool:
        return await backend.blobs.open(dropped) is None

    await _until(gone, 10, "the untouched blob expires")
    assert await _read(backend.blobs, kept) == b"x" * 100 + b"y" * 100, "touched: still there"
    await backend.blobs.touch([dropped], 60)
    assert await backend.blobs.open(dropped) is None, "touch must not bring an expired blob back"


async def test_replicas_on_one_backing_service_share_the_secret(backend: Backend) -> None:
    first = await backend.blobs.secret()
    assert len(first) == 32 and await backend.blobs.secret() == first
    other = await backend.another()
    if backend.kind == "memory":  # nothing is shared between processes
        assert await other.secret() != first
        return
    assert await other.secret() == first
    racing = [await backend.another() for _ in range(4)]
    assert set(await asyncio.gather(*(r.secret() for r in racing))) == {first}


async def test_every_redis_key_of_a_blob_expires(services: None, real_prefix: str) -> None:
    import redis.asyncio as aioredis

    prefix = f"{real_prefix}:"
    blobs = RedisBlobs(REDIS_URL, prefix)
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        blob_id = _id()
        await blobs.write(blob_id, _chunks(b"a" * MiB, b"b" * MiB, b"c"), 100)
        keys = [k async for k in r.scan_iter(match=f"{prefix}blob:{blob_id}*")]
        assert len(keys) == 4, keys  # three chunks and the meta key
        assert all(0 < ms <= 100_000 for ms in [await r.pttl(k) for k in keys])
        await blobs.touch([blob_id], 5000)
        renewed = [await r.pttl(k) for k in keys]
        assert all(100_000 < ms <= 5_000_000 for ms in renewed), "touch renews every key"
    finally:
        await r.aclose()
        await blobs.close()
        drop_redis_prefix(prefix)


async def test_files_expire_by_modification_time_and_are_swept_without_any_write(
    tmp_path: Path,
) -> None:
    """An idle broker's blob directory empties: a timer, not the next write, removes expired
    files (and temporary ones a dead writer left) and leaves the rest."""
    blobs = make_blobs(Settings(blob_dir=str(tmp_path), result_ttl=2))
    assert isinstance(blobs, FileBlobs) and blobs.sweep_every == 1.0
    await blobs.start()
    try:
        await blobs.secret()
        short, old, kept = _id(), _id(), _id()
        await blobs.write(short, _chunks(b"short-lived"), 2)  # the settings' TTL
        await blobs.write(old, _chunks(b"old"), 60)
        await blobs.write(kept, _chunks(b"kept"), 60)
        past = time.time() - 1
        os.utime(tmp_path / old, (past, past))
        assert await blobs.open(old) is None, "an expired file is not served before the sweep"
        stale_temp, fresh_temp = tmp_path / ".tmp-abandoned", tmp_path / ".tmp-writing"
        stale_temp.write_bytes(b"left by a writer that died")
        long_ago = time.time() - files.STALE_TEMP - 1
        os.utime(stale_temp, (long_ago, long_ago))
        fresh_temp.write_bytes(b"still being written")

        async def swept() -> bool:
            return not any(p.exists() for p in (tmp_path / short, tmp_path / old, stale_temp))

        await _until(swept, 10, "the expired files removed by the timer")
        assert fresh_temp.exists() and (tmp_path / files.SECRET).exists()
        assert await _read(blobs, kept) == b"kept"
        assert await blobs.open("../etc/passwd") is None and await blobs.open("short") is None
    finally:
        sweeper = blobs._sweeper
        await blobs.close()
    assert sweeper is not None and not sweeper.running and blobs._sweeper is None, "close stops it"


@pytest.mark.parametrize(("ttl", "every"), [(7 * 24 * 3600, 60.0), (120, 30.0), (2, 1.0),
                                            (1, 1.0)])
def test_the_sweep_period_is_a_quarter_of_the_ttl_between_a_second_and_a_minute(
    ttl: float, every: float
) -> None:
    assert files.sweep_period(ttl) == every
