"""A bounded load: many submitting clients, several endpoints, every result checked, broker RSS sampled.

Shared by ``tests/faults/test_load.py`` and ``python -m bench.load``. Each
client is a thread with its own :class:`farcall.Client` and
:class:`farcall.Executor`, submitting short tasks in waves and checking every
result before the next wave. Broker memory is sampled during the run; after
the warm-up it must stay flat (see :data:`RSS_SLACK`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.faults import abandon_executor

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 120.0
"""How long the clients submit; ``FARCALL_LOAD_SECONDS`` overrides it."""
RSS_SLACK = 100 * 2**20
"""Broker memory is flat when the RSS at the end is at most this much above the sample after warm-up."""
WAVE_TIMEOUT = 60.0
"""Seconds a wave's results may take; a wave still pending then counts as lost and ends its client."""


def load_seconds(default: float = DEFAULT_SECONDS) -> float:
    """``FARCALL_LOAD_SECONDS`` if set, else ``default``."""
    raw = os.environ.get("FARCALL_LOAD_SECONDS", "")
    try:
        seconds = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"FARCALL_LOAD_SECONDS must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ValueError(f"FARCALL_LOAD_SECONDS must be positive, got {raw!r}")
    return seconds


def doubling_task() -> Callable[[int], int]:
    """``x -> x * 2``, made in a factory so dill sends it by value (workers cannot import harness)."""

    def farcall_load_task(x: int) -> int:
        return x * 2

    return farcall_load_task


@dataclass
class LoadReport:
    """What the clients saw and how the broker's memory went."""

    seconds: float
    clients: int
    endpoints: int
    wave: int
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    """Tasks whose future raised: the load must produce none."""
    client_errors: int = 0
    """Clients that stopped on an exception of their own (submission refused, ...)."""
    wrong: int = 0
    lost: int = 0
    """Unresolved when their wave timed out, plus wrong results."""
    waves: int = 0
    wall_seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds into the run, broker RSS in bytes), every few seconds and once at the end."""
    rss_warm: int = 0
    rss_end: int = 0
    rss_slack: int = RSS_SLACK

    @property
    def tasks_per_second(self) -> float:
        return self.succeeded / self.wall_seconds if self.wall_seconds else 0.0

    def line(self) -> str:
        mib = 2**20
        samples = " ".join(f"{t:.0f}s:{rss / mib:.0f}" for t, rss in self.rss_samples)
        return (f"LOAD REPORT clients={self.clients} endpoints={self.endpoints} wave={self.wave} "
                f"seconds={self.seconds:.0f} wall={self.wall_seconds:.1f}s waves={self.waves} "
                f"submitted={self.submitted} succeeded={self.succeeded} failed={self.failed} "
                f"client_errors={self.client_errors} wrong={self.wrong} lost={self.lost} "
                f"rate={self.tasks_per_second:.0f}/s broker_rss_MiB warm={self.rss_warm / mib:.0f} "
                f"end={self.rss_end / mib:.0f} bound=warm+{self.rss_slack / mib:.0f}\n"
                f"    rss samples (MiB): {samples}"
                + (f"\n    errors: {json.dumps(self.errors)}" if self.errors else ""))

    def emit(self) -> None:
        """Print the report; append it to ``$FARCALL_FAULT_REPORT`` as a JSON line when set."""
        print(self.line(), flush=True)
        path = os.environ.get("FARCALL_FAULT_REPORT")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps({"scenario": "load", **asdict(self), "at": time.time()}) + "\n")

    def assert_ok(self) -> None:
        """No errors, nothing lost, every result right, broker memory flat after the warm-up."""
        assert self.submitted > 0, f"nothing was submitted:\n{self.line()}"
        assert self.failed == 0 and self.client_errors == 0, f"errors under load:\n{self.line()}"
        assert self.lost == 0 and self.wrong == 0, f"tasks lost under load:\n{self.line()}"
        assert self.succeeded == self.submitted, self.line()
        assert self.rss_warm > 0, f"no broker memory sample after the warm-up:\n{self.line()}"
        assert self.rss_end <= self.rss_warm + self.rss_slack, (
            f"broker memory grew by more than {self.rss_slack // 2**20} MiB:\n{self.line()}")


def _error_key(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120] if text else ''}"


class _Tally:
    """Counts shared by the client threads."""

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        self.lock = threading.Lock()
        self.errors: collections.Counter[str] = collections.Counter()

    def wave(self, futures: list[Any], xs: range, pending: int) -> None:
        r = self.report
        with self.lock:
            r.waves += 1
            r.submitted += len(futures)
            r.lost += pending
            for f, x in zip(futures, xs, strict=True):
                if not f.done():
                    continue
                if f.cancelled():
                    r.failed += 1
                    self.errors["cancelled"] += 1
                elif (e := f.exception()) is not None:
                    r.failed += 1
                    self.errors[_error_key(e)] += 1
                elif f.result() != 2 * x:
                    r.wrong += 1
                    r.lost += 1
                else:
                    r.succeeded += 1

    def client_error(self, e: BaseException) -> None:
        with self.lock:
            self.report.client_errors += 1
            self.errors[_error_key(e)] += 1


def run_load(
    broker_url: str,
    token: str,
    endpoint_ids: Sequence[str],
    broker_rss: Callable[[], int],
    *,
    seconds: float,
    clients: int = 20,
    wave: int = 50,
    warmup: float | None = None,
    sample_every: float = 5.0,
    say: Callable[[str], None] = print,
) -> LoadReport:
    """Run ``clients`` submitting threads for ``seconds`` (client ``k`` uses endpoint ``k % len``).

    ``broker_rss()`` is sampled every ``sample_every`` seconds; the first sample
    at or after ``warmup`` seconds (default: 15% of the run, at least 10 s, at
    most half of it) is the baseline, the one after every client stopped the end.
    """
    from farcall import Client, Executor

    if not endpoint_ids:
        raise ValueError("run_load needs at least one endpoint id")
    warm_at = warmup if warmup is not None else min(max(10.0, 0.15 * seconds), seconds / 2)
    report = LoadReport(seconds=seconds, clients=clients, endpoints=len(endpoint_ids), wave=wave)
    tally = _Tally(report)
    stop_at = time.monotonic() + seconds
    finished = threading.Event()
    t0 = time.monotonic()

    def client_loop(k: int) -> None:
        fn = doubling_task()
        client = Client(broker_url=broker_url, token=token)
        ex = Executor(endpoint_id=endpoint_ids[k % len(endpoint_ids)], client=client)
        next_x = k * 1_000_000_000
        stuck = False
        try:
            while time.monotonic() < stop_at:
                xs = range(next_x, next_x + wave)
                next_x += wave
                futures = [ex.submit(fn, x) for x in xs]
                _, pending = concurrent.futures.wait(futures, timeout=WAVE_TIMEOUT)
                tally.wave(futures, xs, len(pending))
                if pending:
                    stuck = True
                    log.error("client %d: %d of %d results missing after %.0f s; this client stops",
                              k, len(pending), wave, WAVE_TIMEOUT)
                    break
        except Exception as e:  # noqa: BLE001 - counted and reported; the other clients go on
            log.exception("client %d failed", k)
            tally.client_error(e)
            stuck = True
        finally:
            if stuck:
                abandon_executor(ex)
            else:
                ex.shutdown(wait=True)
            client.close()

    def sampler() -> None:
        while not finished.wait(sample_every):
            t = time.monotonic() - t0
            try:
                rss = broker_rss()
            except Exception as e:  # noqa: BLE001 - a dead broker shows in the clients' errors
                log.warning("cannot sample the broker's memory: %r", e)
                continue
            report.rss_samples.append((t, rss))
            if not report.rss_warm and t >= warm_at:
                report.rss_warm = rss
                say(f"load: broker RSS after warm-up ({t:.0f} s): {rss / 2**20:.0f} MiB")

    threads = [threading.Thread(target=client_loop, args=(k,), name=f"load-client-{k}", daemon=True)
               for k in range(clients)]
    watcher = threading.Thread(target=sampler, name="load-rss", daemon=True)
    say(f"load: {clients} clients, {len(endpoint_ids)} endpoints, waves of {wave}, {seconds:.0f} s")
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + WAVE_TIMEOUT + 30)
    report.wall_seconds = time.monotonic() - t0
    finished.set()
    watcher.join(sample_every + 5)
    report.rss_end = broker_rss()
    report.rss_samples.append((time.monotonic() - t0, report.rss_end))
    if not report.rss_warm:  # a run shorter than one sampling period: the first sample stands in
        report.rss_warm = report.rss_samples[0][1]
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        tally.client_error(RuntimeError(f"clients still running at the end: {alive}"))
    report.errors = dict(tally.errors.most_common(8))
    report.emit()
    return report
