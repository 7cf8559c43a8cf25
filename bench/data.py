"""``python -m bench --data``: a numpy array to a worker and back, through farcall's data plane
and through Dask, side by side on loopback.

Each round trip calls ``bench.arrays.stamp(array) -> (start, array)``; the start splits it
into the way there (submit to the function running: pack, upload, dispatch, the worker's
download) and the way back (the function returning to the caller holding the array: the
worker's upload, the result, the caller's download). farcall also gets its bare data plane
timed (``Client.upload_blob`` / ``download_blob`` of the same array), and its broker's RSS
is sampled during every round trip: the growth is the peak over the RSS just before (the
largest of the round trips; every other figure is their median).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np

from bench.arrays import stamp
from bench.context import RunContext
from bench.farcall_deploy import Broker, Endpoint
from bench.procs import rss_mb
from bench.stats import median
from harness.procs import wait_until

Say = Callable[[str], None]
MB = 1_000_000
"""Decimal, as "MB/s" is read: 1 GB (10^9 bytes) stays under the default 1 GiB limit per task."""
SIZES_MB = (1, 10, 100, 1000)
TRIP_TIMEOUT = 600.0


def repeats(size_mb: int, quick: bool) -> int:
    """Round trips per size (the median is reported): fewer for big arrays and ``--quick``."""
    if size_mb >= 1000:
        return 1
    if size_mb >= 100:
        return 2 if quick else 3
    return 3 if quick else 5


def array_of(size_mb: int) -> Any:
    return np.arange(size_mb * MB // 8, dtype=np.float64)


class RssPeak:
    """Samples the RSS of some processes every ``period`` seconds in a thread; ``growth_mb`` is
    the peak over the first sample."""

    def __init__(self, processes: Callable[[], list[Any]], period: float = 0.01) -> None:
        self._processes = processes
        self._period = period
        self._stop = threading.Event()
        self.before = rss_mb(processes())
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        procs = self._processes()
        while not self._stop.wait(self._period):
            self.peak = max(self.peak, rss_mb(procs))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak - self.before


def trip_figures(size: int, t0: float, started: float, t1: float) -> dict[str, float]:
    """MB/s each way and for the round trip (2 x size over its time), from wall-clock stamps."""
    there, back, total = started - t0, t1 - started, t1 - t0
    return {"there_s": there, "back_s": back, "total_s": total,
            "there_mbps": size / MB / there, "back_mbps": size / MB / back,
            "round_trip_mbps": 2 * size / MB / total}


class FarcallData:
    """A broker on the run's Redis and RabbitMQ, an endpoint (ProcessPoolEngine, 2 workers), the
    SDK's ``Executor`` (batch_size 1). Blobs in Redis, or with ``files`` in ``FARCALL_BLOB_DIR``
    (a directory of the run's, on the local disk)."""

    def __init__(self, ctx: RunContext, files: bool = False) -> None:
        self.ctx = ctx
        self.name = "farcall-files" if files else "farcall"
        self.broker = Broker(ctx, f"{self.name}-data")
        if files:
            self.broker.env["FARCALL_BLOB_DIR"] = str(ctx.workdir / "blobs")
        self.endpoint: Endpoint | None = None
        self.client: Any = None
        self.executor: Any = None
        self.endpoint_id = ""
        self.leftovers: list[int] = []

    def start(self) -> None:
        from farcall import Client, Executor

        self.broker.start()
        token = self.broker.create_user(f"bench-{self.name}-{self.ctx.run_id}")
        self.client = Client(broker_url=self.broker.url, token=token)
        self.endpoint = Endpoint(self.ctx, self.broker, token, f"{self.name}-ep", "ProcessPoolEngine")
        self.endpoint.prepare()
        self.endpoint.spawn()
        self.endpoint_id = self.endpoint.wait_online(self.client)
        wait_until(lambda: self.client.get_endpoint_status(self.endpoint_id)["workers"] >= 2, 60,
                   "2 workers")
        self.executor = Executor(endpoint_id=self.endpoint_id, client=self.client, batch_size=1)
        self.executor.submit(stamp, 0).result(timeout=60)  # function registered, stream up
        self.client.limits()  # asked once per Client: not part of the first upload's time

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.endpoint is not None:
            self.leftovers += self.endpoint.stop()
            if self.endpoint_id and self.broker.proc.alive():
                try:
                    self.client.delete_endpoint(self.endpoint_id)
                except Exception:  # noqa: BLE001 - the cleanup removes its queue anyway
                    pass
        self.leftovers += self.broker.stop()
        if self.client is not None:
            self.client.close()

    def trip(self, array: Any) -> dict[str, float]:
        rss = RssPeak(self.broker.tree)
        t0 = time.time()
        started, back = self.executor.submit(stamp, array).result(timeout=TRIP_TIMEOUT)
        t1 = time.time()
        found = trip_figures(array.nbytes, t0, started, t1)
        found["broker_rss_growth_mb"] = rss.stop()
        _check(back, array)
        return found

    def bare(self, array: Any) -> dict[str, float]:
        """The data plane alone: one upload and one download of the array's blob."""
        from farcall.serialize import pack, unpack_blob

        t0 = time.perf_counter()
        ref = self.client.upload_blob(pack(array))
        t1 = time.perf_counter()
        back = unpack_blob(self.client.download_blob(ref))
        t2 = time.perf_counter()
        _check(back, array)
        return {"upload_mbps": array.nbytes / MB / (t1 - t0),
                "download_mbps": array.nbytes / MB / (t2 - t1)}

    def versions(self) -> dict[str, str]:
        return {"farcall": metadata.version("farcall")}


class DaskData:
    """``LocalCluster(n_workers=2, threads_per_worker=1)`` on 127.0.0.1; ``client.scatter`` the
    array, ``client.submit`` the call on it, ``.result()``."""

    name = "dask"

    def __init__(self, ctx: RunContext) -> None:
        self.cluster: Any = None
        self.client: Any = None
        self.leftovers: list[int] = []

    def start(self) -> None:
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)
        self.cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, worker_dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.client.submit(stamp, 0, pure=False).result(timeout=60)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def trip(self, array: Any) -> dict[str, float]:
        t0 = time.time()
        scattered = self.client.scatter(array)
        future = self.client.submit(stamp, scattered, pure=False)
        started, back = future.result(timeout=TRIP_TIMEOUT)
        t1 = time.time()
        del scattered, future
        _check(back, array)
        return trip_figures(array.nbytes, t0, started, t1)

    def versions(self) -> dict[str, str]:
        return {name: metadata.version(name) for name in ("dask", "distributed")}


def _check(back: Any, sent: Any) -> None:
    if back.shape != sent.shape or back[-1] != sent[-1] or not np.array_equal(back[::4099], sent[::4099]):
        raise AssertionError("the array came back different")


DataSystem = FarcallData | DaskData
SYSTEMS: dict[str, Callable[[RunContext], DataSystem]] = {
    "farcall": FarcallData,
    "farcall-files": lambda ctx: FarcallData(ctx, files=True),
    "dask": DaskData,
}


def measure(system: DataSystem, ctx: RunContext, say: Say, found: dict[str, Any]) -> None:
    """Round trips of every size into ``found[size_mb]`` (medians), said as they are known."""
    tag = f"[{system.name:<13}]"
    t = time.perf_counter()
    system.start()
    found["start_s"] = time.perf_counter() - t
    found["versions"] = system.versions()
    for size_mb in SIZES_MB:
        array = array_of(size_mb)
        samples = [system.trip(array) for _ in range(repeats(size_mb, ctx.quick))]
        if isinstance(system, FarcallData):
            samples = [{**s, **system.bare(array)} for s in samples]
        row = {key: median([s[key] for s in samples]) for key in samples[0]}
        if "broker_rss_growth_mb" in row:  # the worst, not the median, is what the limit is about
            row["broker_rss_growth_mb"] = max(s["broker_rss_growth_mb"] for s in samples)
        row["round_trips"] = len(samples)
        found[str(size_mb)] = row
        say(f"{tag} {size_mb:>5} MB  there {row['there_mbps']:7.0f} MB/s  back "
            f"{row['back_mbps']:7.0f} MB/s  round trip {row['round_trip_mbps']:7.0f} MB/s "
            f"({row['total_s']:.2f} s)" + (
                f"  broker RSS +{row['broker_rss_growth_mb']:.0f} MB  bare upload "
                f"{row['upload_mbps']:.0f} / download {row['download_mbps']:.0f} MB/s"
                if "broker_rss_growth_mb" in row else ""))
        del array, samples
        gc.collect()


def run(ctx: RunContext, say: Say, names: list[str], found: dict[str, Any]) -> None:
    """Measure the ``SYSTEMS`` of ``names`` one after the other, into ``found`` by name as it
    goes (an interrupted run keeps what it measured)."""
    for name in names:
        system = SYSTEMS[name](ctx)
        found[name] = {}
        try:
            measure(system, ctx, say, found[name])
        except Exception as e:  # noqa: BLE001 - keep the other systems' numbers
            found[name]["error"] = f"{type(e).__name__}: {e}"
            say(f"[{name:<13}] FAILED: {type(e).__name__}: {e}")
        finally:
            system.stop()
            if system.leftovers:
                found[name]["leftover_pids_killed"] = system.leftovers


def table(found: dict[str, Any]) -> str:
    """The summary (Markdown): per system and size, MB/s each way and for the round trip, and
    for farcall its bare data plane and its broker's RSS growth."""
    head = ["system", "size", "there MB/s", "back MB/s", "round trip MB/s", "round trip s",
            "bare up / down MB/s", "broker RSS growth MiB"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, figures in found.items():
        for size_mb in SIZES_MB:
            row = figures.get(str(size_mb))
            if row is None:
                continue
            total = row.get("total_s")
            lines.append("| " + " | ".join([
                name, f"{size_mb:,} MB" if size_mb < 1000 else "1 GB", _n(row.get("there_mbps")),
                _n(row.get("back_mbps")), _n(row.get("round_trip_mbps")),
                "-" if total is None else f"{total:.2f}",
                "-" if "upload_mbps" not in row else
                f"{_n(row['upload_mbps'])} / {_n(row['download_mbps'])}",
                _n(row.get("broker_rss_growth_mb"))]) + " |")
    return "\n".join(lines)


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"
