"""File ``BlobStore``: one file per blob in a directory every broker replica mounts
(``FARCALL_BLOB_DIR``: a volume, NFS).

A blob is written to a hidden temporary file in the directory and renamed into place once
complete, so a reader on any replica sees a whole blob or none. Its expiry is the file's
modification time (set before the rename, moved by ``touch``), so it travels with the file
in one atomic step; reads refuse an expired file, and a sweep on a timer (started with the
store, every ``sweep_every`` seconds: see :func:`sweep_period`) removes expired files and
temporary ones a crashed writer left, so an idle broker's disk empties too. The grant secret
is the file ``.secret``, made once by whichever replica asks first (a hard link never
overwrites). Blocking file calls run in threads, off the event loop.

A file starts with a short header naming the blob's owner (``HEADER``: magic, owner's length,
owner); a file without it (written before owners were kept) has none. The quota's bookkeeping
is a ``BlobLedger`` in memory: each replica counts the blobs it stored itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import BinaryIO

from farcall.broker.periodic import Periodic
from farcall.broker.store.base import (
    BLOB_CHUNK,
    BLOB_ID,
    Blob,
    BlobLedger,
    BlobStore,
    write_behind,
)

log = logging.getLogger(__name__)

TEMP = ".tmp-"
"""Names of files still being written start with this (blob ids never start with a dot)."""
SECRET = ".secret"
SECRET_BYTES = 32
SWEEP_EVERY = 60.0
"""The longest time between two looks for expired files, on each replica."""
MIN_SWEEP_EVERY = 1.0
"""The shortest: a short TTL does not turn the sweep into a busy loop over the directory."""
STALE_TEMP = 3600.0
"""A temporary file untouched this long belongs to a writer that died."""
MAGIC = b"\x00fcblob1"
HEADER = struct.Struct(">8sH")
"""What a blob file starts with: ``MAGIC`` and the length of the owner's id (UTF-8), which
follows."""


def _header(owner: str) -> bytes:
    raw = owner.encode()
    return HEADER.pack(MAGIC, len(raw)) + raw


def sweep_period(ttl: float) -> float:
    """Seconds between sweeps for blobs that live ``ttl`` seconds: a quarter of it (an expired
    file stays at most that long past its time), between 1 s and a minute."""
    return max(MIN_SWEEP_EVERY, min(ttl / 4, SWEEP_EVERY))


class _Sweep(Periodic):
    """The look for expired files, on a timer while the store is started."""

    name = "blob-sweep"

    def __init__(self, blobs: FileBlobs) -> None:
        super().__init__(blobs.sweep_every, log)
        self._blobs = blobs

    async def step(self, at: float) -> bool:
        await asyncio.to_thread(self._blobs._sweep, time.time())
        return False


class FileBlobs(BlobStore):
    """Blobs as files in ``directory``, swept every ``sweep_every`` seconds while started."""

    def __init__(self, directory: str | os.PathLike[str], sweep_every: float = SWEEP_EVERY) -> None:
        self.dir = Path(directory)
        self.sweep_every = sweep_every
        self._secret: bytes | None = None
        self._sweeper: _Sweep | None = None
        self._ledger = BlobLedger()

    def _path(self, blob_id: str) -> Path:
        if not BLOB_ID.fullmatch(blob_id):
            raise ValueError(f"{blob_id[:80]!r} is not a blob id")
        return self.dir / blob_id

    async def start(self) -> None:
        """Make the directory, and start the sweeps (even if it cannot be made yet: it may be
        mounted later, and ``ping`` says so meanwhile)."""
        if self._sweeper is None:
            self._sweeper = _Sweep(self)
            self._sweeper.start()
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            await sweeper.stop()

    async def ping(self) -> None:
        if not await asyncio.to_thread(os.access, self.dir, os.W_OK | os.X_OK):
            raise OSError(f"the blob directory {self.dir} is missing or not writable")

    async def write(self, blob_id: str, chunks: AsyncIterable[bytes], ttl: float,
                    owner: str = "", size: int = 0, quota: int = 0) -> int:
        path = self._path(blob_id)
        if owner:
            self._ledger.reserve(owner, blob_id, size, ttl, quota)
        temp = self.dir / f"{TEMP}{blob_id}.{secrets.token_hex(4)}"
        try:
            file = await asyncio.to_thread(_create, temp, _header(owner))
            try:
                async def put(_: int, chunk: bytes) -> None:
                    await asyncio.to_thread(file.write, chunk)

                try:
                    _, written = await write_behind(chunks, put)
                finally:
                    await asyncio.to_thread(file.close)
                await asyncio.to_thread(_publish, temp, path, time.time() + ttl)
            except BaseException:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise
        except BaseException:
            self._ledger.release(blob_id)
            raise
        return written

    async def open(self, blob_id: str) -> Blob | None:
        if not BLOB_ID.fullmatch(blob_id):
            return None
        found = await asyncio.to_thread(_open_live, self._path(blob_id))
        if found is None:
            return None
        file, owner = found
        return Blob(os.fstat(file.fileno()).st_size - file.tell(), _read(file), owner)

    async def touch(self, blob_ids: list[str], ttl: float) -> None:
        ids = [b for b in blob_ids if BLOB_ID.fullmatch(b)]
        if ids:
            await asyncio.to_thread(_touch, [self._path(b) for b in ids], time.time() + ttl)
            for blob_id in ids:
                self._ledger.touch(blob_id, ttl)

    async def delete(self, blob_ids: list[str]) -> None:
        ids = [b for b in blob_ids if BLOB_ID.fullmatch(b)]
        if ids:
            await asyncio.to_thread(_remove, [self._path(b) for b in ids])
            for blob_id in ids:
                self._ledger.release(blob_id)

    async def usage(self, owner: str) -> int:
        return self._ledger.usage(owner)

    async def secret(self) -> bytes:
        if self._secret is None:
            self._secret = await asyncio.to_thread(self._make_secret)
        return self._secret

    def _make_secret(self) -> bytes:
        path = self.dir / SECRET
        if not path.exists():
            temp = self.dir / f"{TEMP}secret.{secrets.token_hex(4)}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SECRET_BYTES))
            try:
                os.link(temp, path)  # atomic, whole, and never replaces another replica's
            except FileExistsError:
                pass
            finally:
                temp.unlink()
        found = path.read_bytes()
        if len(found) != SECRET_BYTES:
            raise RuntimeError(f"{path} is not a farcall blob secret ({len(found)} bytes, not "
                               f"{SECRET_BYTES}); remove it and restart the brokers")
        return found

    def _sweep(self, now: float) -> None:
        """Remove expired blobs and abandoned temporary files (another replica may be doing
        the same: a file already gone is fine)."""
        removed = 0
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if entry.name.startswith(TEMP):
                    before = now - STALE_TEMP
                elif entry.name.startswith("."):
                    continue
                else:
                    before = now
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime <= before:
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            log.info("removed %d expired blob files from %s", removed, self.dir)


def _create(path: Path, header: bytes) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    file = os.fdopen(fd, "wb")
    file.write(header)
    return file


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _publish(temp: Path, path: Path, expires: float) -> None:
    os.utime(temp, (expires, expires))
    os.replace(temp, path)


def _open_live(path: Path) -> tuple[BinaryIO, str] | None:
    """The blob's file, open at its first byte of data, and its owner, if it exists and has not
    expired (the open file stays readable if a sweep removes it meanwhile)."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - the reader closes it
    except FileNotFoundError:
        return None
    if os.fstat(file.fileno()).st_mtime <= time.time():
        file.close()
        return None
    start = file.read(HEADER.size)
    owner = ""
    if len(start) == HEADER.size and start[:len(MAGIC)] == MAGIC:
        owner = file.read(HEADER.unpack(start)[1]).decode()
    else:
        file.seek(0)  # written before blobs had owners
    return file, owner


def _touch(paths: list[Path], expires: float) -> None:
    now = time.time()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime > now:  # an expired blob is not brought back
                os.utime(path, (expires, expires))


async def _read(file: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, BLOB_CHUNK):
            yield chunk
    finally:
        file.close()
