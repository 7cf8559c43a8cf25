"""Engines run tasks and report them; a dead worker process fails its task instead of hanging."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from farcall.endpoint.engines import Engine, build_engine, validate_engine
from farcall.endpoint.engines.processes import ProcessPoolEngine
from farcall.endpoint.errors import EndpointConfigError, WorkerLost
from harness.procs import wait_until
from tests.endpoint.helpers import Collector, make_task, value_of


@pytest.fixture(params=["ThreadPoolEngine", "ProcessPoolEngine"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    e = build_engine({"type": request.param, "max_workers": 2})
    e.start()
    yield e
    e.shutdown(wait=False)


@pytest.fixture
def pool() -> Iterator[ProcessPoolEngine]:
    e = ProcessPoolEngine(max_workers=2)
    e.start()
    yield e
    e.shutdown(wait=False)


def test_runs_many_tasks_and_reports_each_once(engine: Engine) -> None:
    def square(x: int) -> int:
        return x * x

    got = Collector()
    tasks = [make_task(square, i) for i in range(300)]
    for t in tasks:
        engine.submit(t, got.on_done, got.on_start)
    results = got.wait_results([t.task_id for t in tasks])
    assert [value_of(r) for r in results] == [i * i for i in range(300)]
    assert not got.duplicates
    assert set(got.started) == {t.task_id for t in tasks}
    wait_until(lambda: engine.status().running_tasks == 0, 10, "engine idle")
    status = engine.status()
    assert status.workers == 2 and status.idle_workers == 2 and status.pending_tasks == 0
    assert engine.capacity >= 2


def test_remote_exception_comes_back_as_failed_result(engine: Engine) -> None:
    def boom() -> None:
        raise KeyError("nope")

    got = Collector()
    task = make_task(boom)
    engine.submit(task, got.on_done)
    (result,) = got.wait_results([task.task_id])
    with pytest.raises(KeyError, match="nope"):
        value_of(result)


def test_long_tasks_spread_over_workers(engine: Engine, tmp_path: Path) -> None:
    """Two blocking tasks submitted together run at the same time, not one behind the other."""

    def hold(marker: str, gate: str) -> str:
        import os

        open(marker, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.01)
        return marker

    got = Collector()
    gate = tmp_path / "gate"
    tasks = [make_task(hold, str(tmp_path / f"m{i}"), str(gate)) for i in range(2)]
    for t in tasks:
        engine.submit(t, got.on_done, got.on_start)
    wait_until(lambda: all((tmp_path / f"m{i}").exists() for i in range(2)), 30, "both running")
    assert engine.status().running_tasks == 2
    gate.touch()
    assert [value_of(r) for r in got.wait_results([t.task_id for t in tasks])] == [
        str(tmp_path / "m0"), str(tmp_path / "m1")]


def test_cancel_pending_returns_queued_tasks_only(engine: Engine, tmp_path: Path) -> None:
    def hold(gate: str) -> None:
        import os

        deadline = time.time() + 60
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.01)

    got = Collector()
    gate = tmp_path / "gate"
    running = [make_task(hold, str(gate)) for _ in range(2)]
    for t in running:
        engine.submit(t, got.on_done, got.on_start)
    got.wait(lambda: len(got.started) == 2, 30, "two tasks started")
    queued = [make_task(hold, str(gate)) for _ in range(3)]
    for t in queued:
        engine.submit(t, got.on_done, got.on_start)
    wait_until(lambda: engine.status().pending_tasks == 3, 10, "three queued")
    assert sorted(engine.cancel_pending()) == sorted(t.task_id for t in queued)
    gate.touch()
    got.wait_results([t.task_id for t in running])
    assert not any(t.task_id in got.results for t in queued)


def test_task_that_kills_its_worker_gets_worker_lost(caplog: pytest.LogCaptureFixture) -> None:
    """The crasher shares a chunk with others: they run again alone and succeed; it fails."""

    def die() -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    def square(x: int) -> int:
        return x * x

    got = Collector()
    others = [make_task(square, i) for i in range(20)]
    crasher = make_task(die)
    pool = ProcessPoolEngine(max_workers=2)
    for t in [*others[:5], crasher, *others[5:]]:  # queued before start: sent in two chunks
        pool.submit(t, got.on_done, got.on_start)
    pool.start()
    try:
        results = got.wait_results([crasher.task_id, *(t.task_id for t in others)], timeout=60)
        with pytest.raises(WorkerLost, match="signal 9"):
            value_of(results[0])
        assert [value_of(r) for r in results[1:]] == [i * i for i in range(20)]
        assert not got.duplicates
        assert "running each alone" in caplog.text
        # the pool replaced the dead worker and keeps working
        after = make_task(square, 12)
        pool.submit(after, got.on_done)
        assert value_of(got.wait_results([after.task_id])[0]) == 144
        assert pool.status().workers == 2
    finally:
        pool.shutdown(wait=False)


def test_worker_killed_from_outside_mid_task_gets_worker_lost(
    pool: ProcessPoolEngine, tmp_path: Path
) -> None:
    def sleepy(pidfile: str) -> None:
        import os

        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)

    got = Collector()
    pidfile = tmp_path / "pid"
    task = make_task(sleepy, str(pidfile))
    pool.submit(task, got.on_done)
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 30, "task running"))
    os.kill(pid, signal.SIGKILL)
    (result,) = got.wait_results([task.task_id], timeout=30)
    with pytest.raises(WorkerLost, match=task.task_id):
        value_of(result)


def test_shutdown_wait_lets_submitted_tasks_finish() -> None:
    def square(x: int) -> int:
        return x * x

    pool = ProcessPoolEngine(max_workers=2)
    pool.start()
    got = Collector()
    tasks = [make_task(square, i) for i in range(50)]
    for t in tasks:
        pool.submit(t, got.on_done)
    pool.shutdown(wait=True, timeout=60)
    assert len(got.results) == 50


def test_unknown_engine_type_names_the_valid_choices() -> None:
    with pytest.raises(EndpointConfigError, match="ThreadPoolEngine, ProcessPoolEngine"):
        build_engine({"type": "FancyEngine"})


def test_bad_engine_option_names_the_key() -> None:
    with pytest.raises(EndpointConfigError, match=r"engine\.max_workers"):
        validate_engine({"type": "ProcessPoolEngine", "max_workers": 0})
    with pytest.raises(EndpointConfigError, match=r"engine\.max_worker: unknown key.*max_workers"):
        validate_engine({"type": "ThreadPoolEngine", "max_worker": 2})
    with pytest.raises(EndpointConfigError, match=r"engine\.max_chunk: unknown key"):
        validate_engine({"type": "ThreadPoolEngine", "max_chunk": 2})
