"""The data plane on real broker processes and real Redis: two replicas behind one address
share blobs (in Redis, or in a directory both mount) and the grant secret, and a broker
streams a blob through without holding it (its RSS stays flat)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from farcall.broker import grants
from harness.services import redis_keys
from tests.broker.helpers import FakeEndpoint
from tests.integration.helpers import Broker, own_broker, own_replicas

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
RSS_BOUND = 64 * MiB
"""What the issue allows a broker's RSS to grow by while a 100 MB blob goes through."""


def _upload(broker: Broker, headers: dict[str, str], size: int) -> tuple[str, str]:
    """Stream ``size`` random bytes up as one blob; its id and the bytes' SHA-256."""
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        left = size
        while left:
            piece = os.urandom(min(MiB, left))
            digest.update(piece)
            left -= len(piece)
            yield piece

    r = httpx.post(f"{broker.url}/v1/blobs", content=body(), timeout=120,
                   headers={**headers, "Content-Length": str(size)})
    assert r.status_code == 201, r.text
    assert r.json()["size"] == size
    return r.json()["blob_id"], digest.hexdigest()


def _download(broker: Broker, headers: dict[str, str], blob_id: str) -> tuple[int, str]:
    """The blob's size and SHA-256, streamed down."""
    digest, size = hashlib.sha256(), 0
    with httpx.stream("GET", f"{broker.url}/v1/blobs/{blob_id}", headers=headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
        assert int(r.headers["content-length"]) == size
    return size, digest.hexdigest()


@pytest.mark.parametrize("backend", ["redis", "files"])
def test_a_blob_uploaded_to_one_replica_downloads_from_the_other(
    backend: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    blob_dir = tmp_path / "blobs"
    settings = {"FARCALL_BLOB_DIR": str(blob_dir)} if backend == "files" else {}
    with own_replicas(service_env, tmp_path, f"data-{backend}", 2, settings=settings) as (a, b):
        user = {"Authorization": f"Bearer {a.create_user('alice')}"}
        size = 50 * MiB
        blob_id, sent = _upload(a, user, size)
        assert _download(b, user, blob_id) == (size, sent)
        if backend == "files":
            assert (blob_dir / blob_id).stat().st_size == size
        else:
            keys = redis_keys(f"{a.env['FARCALL_REDIS_PREFIX']}blob:{blob_id}")
            chunks = range(-(-size // (4 * MiB + 64 * 1024)), -(-size // (4 * MiB)) + 1)
            assert keys - 1 in chunks, f"{keys} keys: chunks of about 4 MiB and the meta key"

        # The grant an endpoint got from one replica works on the other (one shared secret).
        ep = httpx.post(f"{a.url}/v1/endpoints", json={"name": "ep"}, headers=user).json()
        fake = FakeEndpoint(a.url, ep["endpoint_id"], ep["credential"])
        try:
            welcome = fake.hello(credit=1)
        finally:
            fake.close()
        worker = {grants.HEADER: f"{ep['endpoint_id']}:{welcome.upload_grant}"}
        result_id, result = _upload(b, worker, 5 * MiB + 1)
        assert _download(a, worker, result_id) == (5 * MiB + 1, result)
        assert _download(a, worker, blob_id) == (size, sent)


class PeakRss:
    """The highest RSS of a process while the ``with`` block runs, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self._done.wait(0.005):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def test_a_broker_streams_a_100_mb_blob_through_without_holding_it(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    with own_broker(service_env, tmp_path, "rss") as broker:
        user = {"Authorization": f"Bearer {broker.create_user('alice')}"}
        warm_id, _ = _upload(broker, user, 12 * MiB)  # imports, pools and buffers settle first
        _download(broker, user, warm_id)
        before = broker.proc.process().memory_info().rss
        size = 100 * MiB
        with PeakRss(broker.proc.pid) as up:
            blob_id, sent = _upload(broker, user, size)
        with PeakRss(broker.proc.pid) as down:
            assert _download(broker, user, blob_id) == (size, sent)
        grew = max(up.peak, down.peak) - before
        assert grew < RSS_BOUND, (
            f"the broker's RSS grew by {grew / MiB:.1f} MiB moving a {size // MiB} MiB blob "
            f"(upload peak {up.peak / MiB:.0f} MiB, download peak {down.peak / MiB:.0f} MiB, "
            f"before {before / MiB:.0f} MiB)")
