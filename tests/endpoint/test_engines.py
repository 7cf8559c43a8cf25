"""Engines run tasks and report them; a dead worker process fails its task instead of hanging."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from farcall.endpoint.engines import Engine, EngineStatus, build_engine, validate_engine
from farcall.endpoint.engines.base import OnDone, OnStart, TaskEntry
from farcall.endpoint.engines.processes import ProcessPoolEngine
from farcall.endpoint.errors import EndpointConfigError, WorkerLost
from farcall.errors import TaskTimeout
from farcall.protocol.channel import ResultMessage, TaskMessage
from farcall.protocol.common import TaskState
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
        import time

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
        import time

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
        import time

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


class _ChunkingStub(Engine):
    """Only the lost-chunk hook; the policy under test is the base class's."""

    def __init__(self) -> None:
        super().__init__()
        self.rerun: list[TaskEntry] = []
        self.stopped: list[TaskEntry] = []

    def entry(self, task_id: str, on_done: OnDone, max_retries: int = 0,
              walltime: float | None = None) -> TaskEntry:
        """A task as ``submit`` registers it."""
        task = TaskMessage(task_id=task_id, function_id="f", args="", max_retries=max_retries,
                           walltime=walltime)
        return self._admit(task, on_done, payload="{}")

    def _rerun_alone(self, entries: list[TaskEntry]) -> None:
        self.rerun.extend(entries)

    def _stop_tasks(self, entries: list[TaskEntry]) -> None:
        self.stopped.extend(entries)

    def start(self) -> None:
        pass

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        pass

    def status(self) -> EngineStatus:
        return EngineStatus()

    @property
    def capacity(self) -> int:
        return 0

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        pass


def test_a_lost_chunk_runs_again_task_by_task_and_a_lost_task_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got = Collector()

    def broken(result: ResultMessage) -> None:
        raise RuntimeError("callback bug")

    engine = _ChunkingStub()
    chunk = [engine.entry(f"t{i}", got.on_done) for i in range(3)]
    engine._lost(chunk, "its worker (pid 1, exit code 7)")
    assert engine.rerun == chunk and all(e.alone for e in chunk) and not got.results
    engine._lost([chunk[1]], "its worker (pid 2, killed by signal 9)")
    (result,) = got.wait_results(["t1"])
    (in_chunk,) = result.attempts  # the chunk's loss costs no retry, but is on the record
    assert "pid 1" in in_chunk.error and "chunk of 3 tasks" in in_chunk.error
    with pytest.raises(WorkerLost, match=r"task t1 was lost with its worker \(pid 2, killed by signal 9\)"
                                         r", in the last of its 2 runs \(max_retries=0\)"
                                         r".*submit the task again, or with max_retries="):
        value_of(result)
    engine._lost([engine.entry("t9", broken)], "its worker (pid 3, exit code 1)")
    assert "result callback failed for task t9" in caplog.text


def test_a_task_lost_alone_runs_again_while_it_has_retries() -> None:
    """Each lost run is kept as an Attempt; the last loss fails it, saying how often it ran."""
    got = Collector()
    engine = _ChunkingStub()
    entry = engine.entry("t1", got.on_done, max_retries=2)
    for pid in (1, 2):
        engine._lost([entry], f"its worker (pid {pid}, exit code 7)")
        assert engine.rerun[-1] is entry and not got.results
    assert entry.attempts is not None and len(entry.attempts) == 2
    assert "pid 2" in entry.attempts[1].error and "retry 2 of 2" in entry.attempts[1].error
    engine._lost([entry], "its worker (pid 3, exit code 7)")
    (result,) = got.wait_results(["t1"])
    assert [a.error for a in result.attempts] == [a.error for a in entry.attempts]
    with pytest.raises(WorkerLost, match=r"pid 3.*in the last of its 3 runs \(max_retries=2\)"):
        value_of(result)
    alone = engine.entry("t2", got.on_done)
    engine._lost([alone], "its worker (pid 5, exit code 7)")
    with pytest.raises(WorkerLost, match=r"pid 5, exit code 7\) \(it ran once; max_retries=0\)"):
        value_of(got.wait_results(["t2"])[0])
    engine._lost([entry], "its worker (pid 4, exit code 7)")  # answered already: nothing more
    assert len(engine.rerun) == 2 and not got.duplicates


def test_the_walltime_watchdog_answers_a_late_task_once_and_stops_its_worker() -> None:
    got = Collector()
    engine = _ChunkingStub()
    late = engine.entry("late", got.on_done, walltime=0.05)
    quick = engine.entry("q", got.on_done, walltime=3600)
    engine._started([late], time.time() - 10, worker="w1")  # started long ago: due now
    engine._started([quick], time.time(), worker="w2")
    engine._finish(quick, ResultMessage(task_id="q", state=TaskState.SUCCESS))
    (result,) = got.wait_results(["late"])
    with pytest.raises(TaskTimeout, match="task late ran past its walltime of 0.05 s"):
        value_of(result)
    wait_until(lambda: engine.stopped, 10, "the late task's worker to be stopped")
    assert engine.stopped == [late] and got.results["q"].state == TaskState.SUCCESS
    engine._finish(late, ResultMessage(task_id="late", state=TaskState.SUCCESS))  # dropped
    engine.cancel(["late", "q"], RuntimeError("cancelled"))  # answered already: ignored
    assert not got.duplicates and engine.stopped == [late]
    engine._stop_watching()


def test_finished_tasks_do_not_pile_up_under_the_walltime_watchdog() -> None:
    engine = _ChunkingStub()
    for i in range(5000):
        entry = engine.entry(f"t{i}", lambda r: None, walltime=3600)
        engine._started([entry], time.time())
        engine._finish(entry, ResultMessage(task_id=entry.task_id, state=TaskState.SUCCESS))
    assert len(engine._deadlines) <= 2048
    engine._stop_watching()
