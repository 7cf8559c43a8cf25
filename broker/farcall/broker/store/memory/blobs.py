"""In-process ``BlobStore`` (embedded mode and unit tests): blobs kept as lists of chunks, for
this process only, with the other backends' expiry and quota; the secret is random per
process."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

from farcall.broker.store.base import Blob, BlobLedger, BlobStore, write_behind

SWEEP_EVERY = 60.0
"""Seconds between looks for expired blobs to forget (done on a write)."""


@dataclass
class _Held:
    chunks: list[bytes]
    size: int
    expires: float
    owner: str = ""


class MemoryBlobs(BlobStore):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._blobs: dict[str, _Held] = {}
        self._secret = secrets.token_bytes(32)
        self._clock = clock
        self._swept = clock()
        self._ledger = BlobLedger(clock)

    async def write(self, blob_id: str, chunks: AsyncIterable[bytes], ttl: float,
                    owner: str = "", size: int = 0, quota: int = 0) -> int:
        if owner:
            self._ledger.reserve(owner, blob_id, size, ttl, quota)
        parts: list[bytes] = []

        async def keep(_: int, chunk: bytes) -> None:
            parts.append(bytes(chunk))

        try:
            _, stored = await write_behind(chunks, keep)
        except BaseException:
            self._ledger.release(blob_id)
            raise
        now = self._clock()
        self._blobs[blob_id] = _Held(parts, stored, now + ttl, owner)
        if now - self._swept > SWEEP_EVERY:
            self._swept = now
            for gone in [b for b, held in self._blobs.items() if held.expires <= now]:
                del self._blobs[gone]
        return stored

    def _live(self, blob_id: str) -> _Held | None:
        held = self._blobs.get(blob_id)
        if held is not None and held.expires <= self._clock():
            del self._blobs[blob_id]
            return None
        return held

    async def open(self, blob_id: str) -> Blob | None:
        held = self._live(blob_id)
        return None if held is None else Blob(held.size, _iterate(held.chunks), held.owner)

    async def touch(self, blob_ids: list[str], ttl: float) -> None:
        for blob_id in blob_ids:
            held = self._live(blob_id)
            if held is not None:
                held.expires = self._clock() + ttl
                self._ledger.touch(blob_id, ttl)

    async def delete(self, blob_ids: list[str]) -> None:
        for blob_id in blob_ids:
            self._blobs.pop(blob_id, None)
            self._ledger.release(blob_id)

    async def usage(self, owner: str) -> int:
        return self._ledger.usage(owner)

    async def secret(self) -> bytes:
        return self._secret

    def __len__(self) -> int:
        """Blobs held, expired ones included until they are next looked at."""
        return len(self._blobs)


async def _iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
