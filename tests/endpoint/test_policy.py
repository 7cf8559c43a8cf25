"""The engines' one failure policy (``engines/policy.py``): cancel, walltime, retries.

First on a stub that has only the policy's hooks, then on real thread and process pools
(Parsl's: ``test_policy_parsl.py``). Every test also checks that each task got exactly
one answer. Tasks signal through files (a marker when they run, a pid when they start, a
gate they wait for), so tests wait on conditions, never on time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from farcall.endpoint.engines import Engine, EngineStatus, build_engine
from farcall.endpoint.engines.base import OnDone, OnStart
from farcall.endpoint.engines.policy import PolicyEngine, TaskEntry
from farcall.endpoint.engines.processes import ProcessPoolEngine
from farcall.endpoint.errors import WorkerLost
from farcall.errors import TaskTimeout
from farcall.protocol.channel import ResultMessage, TaskMessage
from farcall.protocol.common import TaskState
from harness.procs import wait_until
from tests.endpoint.helpers import Collector, make_task, value_of


class Cancelled(Exception):
    """The reason the tests cancel with."""


def hold(marker: str, gate: str) -> int:
    """Write this worker's pid to ``marker``, then wait (at most 60 s) for ``gate``."""
    import os
    import time

    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    deadline = time.time() + 60
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.01)
    return os.getpid()


def mark(marker: str) -> str:
    open(marker, "w").close()
    return marker


def square(x: int) -> int:
    return x * x


def sleepy(seconds: float) -> None:
    import time

    time.sleep(seconds)


def stubborn() -> None:
    """Ignores TaskTimeout: only killing its worker stops it."""
    import time

    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            time.sleep(30)
        except TimeoutError:
            pass


def die_once(marker: str) -> str:
    """Kills its worker the first time it runs, succeeds the second time."""
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return "second time lucky"


def die() -> None:
    import os

    os._exit(3)


def timed(task: TaskMessage, walltime: float | None = None, max_retries: int = 0) -> TaskMessage:
    task.walltime = walltime
    task.max_retries = max_retries
    return task


@pytest.fixture(params=["ThreadPoolEngine", "ProcessPoolEngine"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """One worker, so 'the next task runs' proves the stopped task's worker was freed."""
    e = build_engine({"type": request.param, "max_workers": 1})
    e.start()
    yield e
    e.shutdown(wait=False)


@pytest.fixture
def pool() -> Iterator[ProcessPoolEngine]:
    e = ProcessPoolEngine(max_workers=1)
    e.start()
    yield e
    e.shutdown(wait=False)


def _assert_runs_next(engine: Engine, got: Collector) -> None:
    after = make_task(square, 12)
    engine.submit(after, got.on_done, got.on_start)
    assert value_of(got.wait_results([after.task_id])[0]) == 144


# ------------------------------------------------------------------ the policy alone


class _ChunkingStub(PolicyEngine):
    """Only the policy's hooks, recording; the policy under test is ``PolicyEngine``'s."""

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
    engine._watchdog.stop()


def test_finished_tasks_do_not_pile_up_under_the_walltime_watchdog() -> None:
    engine = _ChunkingStub()
    for i in range(5000):
        entry = engine.entry(f"t{i}", lambda r: None, walltime=3600)
        engine._started([entry], time.time())
        engine._finish(entry, ResultMessage(task_id=entry.task_id, state=TaskState.SUCCESS))
    assert len(engine._watchdog) <= 2048
    engine._watchdog.stop()


# ------------------------------------------------------------------ cancel


def test_cancel_of_a_queued_task_answers_it_at_once_and_it_never_runs(
    engine: Engine, tmp_path: Path
) -> None:
    got = Collector()
    gate = tmp_path / "gate"
    blocker = make_task(hold, str(tmp_path / "pid"), str(gate))
    engine.submit(blocker, got.on_done, got.on_start)
    wait_until((tmp_path / "pid").exists, 30, "the blocker to run")
    queued = make_task(mark, str(tmp_path / "ran"))
    engine.submit(queued, got.on_done, got.on_start)

    engine.cancel([queued.task_id, "no-such-task"], Cancelled("cancelled by the test"))
    assert queued.task_id in got.results  # answered inside cancel, not later
    with pytest.raises(Cancelled, match="cancelled by the test"):
        value_of(got.results[queued.task_id])
    assert queued.task_id not in got.started

    gate.touch()
    got.wait_results([blocker.task_id])
    _assert_runs_next(engine, got)  # one worker, in order: the cancelled task's turn has passed
    assert not (tmp_path / "ran").exists()
    engine.cancel([blocker.task_id], Cancelled("too late"))  # finished: ignored
    assert value_of(got.results[blocker.task_id]) and not got.duplicates
    assert engine.status().pending_tasks == 0


def test_cancel_of_a_running_task_frees_its_worker_for_the_next(
    engine: Engine, tmp_path: Path
) -> None:
    got = Collector()
    gate = tmp_path / "gate"
    running = make_task(hold, str(tmp_path / "pid"), str(gate))
    engine.submit(running, got.on_done, got.on_start)
    pid = int(wait_until(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(),
                         30, "the task to run"))

    engine.cancel([running.task_id], Cancelled("stop it"))
    (result,) = got.wait_results([running.task_id], timeout=0)
    with pytest.raises(Cancelled, match="stop it"):
        value_of(result)
    assert result.started_at == got.started[running.task_id]
    _assert_runs_next(engine, got)
    assert engine.status().workers == 1

    if isinstance(engine, ProcessPoolEngine):
        assert pid != os.getpid()
        wait_until(lambda: not psutil.pid_exists(pid), 10, f"killed worker {pid} to be gone")
    else:  # the abandoned thread ends when its function returns, and its result is dropped
        assert engine.status().details == {"abandoned_threads": 1}
        gate.touch()
        wait_until(lambda: engine.status().details == {"abandoned_threads": 0}, 30,
                   "the abandoned thread to end")
    assert not got.duplicates and got.results[running.task_id] is result


def test_killing_a_worker_to_cancel_a_task_puts_its_chunk_mates_back_in_front(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The other tasks of the killed worker's chunk are not suspects: they run again as
    they were, with no Attempt, ahead of tasks submitted later."""
    got = Collector()
    gate = tmp_path / "gate"
    culprit = make_task(hold, str(tmp_path / "pid"), str(gate))
    mates = [make_task(square, i) for i in range(5)]
    pool = ProcessPoolEngine(max_workers=1)
    for t in [culprit, *mates]:  # queued before start: sent as one chunk
        pool.submit(t, got.on_done, got.on_start)
    pool.start()
    try:
        wait_until((tmp_path / "pid").exists, 30, "the chunk to run")
        assert {got.started[t.task_id] for t in mates} == {got.started[culprit.task_id]}
        later = make_task(square, 10)
        pool.submit(later, got.on_done, got.on_start)
        pool.cancel([culprit.task_id], Cancelled("stop it"))
        results = got.wait_results([t.task_id for t in [*mates, later]])
        assert [value_of(r) for r in results] == [0, 1, 4, 9, 16, 100]
        assert all(r.attempts == [] for r in results)
        assert results[-1].started_at is not None
        assert all(r.started_at is not None and r.started_at <= results[-1].started_at
                   for r in results[:-1])
        assert "lost" not in caplog.text and not got.duplicates
    finally:
        pool.shutdown(wait=False)


# ------------------------------------------------------------------ walltime


def test_walltime_fails_the_task_with_task_timeout_and_frees_its_worker(engine: Engine) -> None:
    got = Collector()
    task = timed(make_task(sleepy, 30), walltime=0.5)
    engine.submit(task, got.on_done, got.on_start)
    (result,) = got.wait_results([task.task_id], timeout=15)  # well before the 30 s sleep ends
    with pytest.raises(TaskTimeout, match=rf"task {task.task_id} ran past its walltime of 0.5 s.*"
                                          r"raise walltime= or make the task shorter"):
        value_of(result)
    _assert_runs_next(engine, got)
    assert not got.duplicates


def test_a_worker_whose_task_ignores_task_timeout_is_killed(pool: ProcessPoolEngine) -> None:
    got = Collector()
    (worker,) = pool._workers
    task = timed(make_task(stubborn), walltime=0.5)
    pool.submit(task, got.on_done, got.on_start)
    (result,) = got.wait_results([task.task_id], timeout=15)
    with pytest.raises(TaskTimeout, match="walltime of 0.5 s"):
        value_of(result)
    pid = worker.pid
    wait_until(lambda: not psutil.pid_exists(pid), 10, f"worker {pid} to be killed")
    _assert_runs_next(pool, got)
    assert not got.duplicates


def test_the_walltime_clock_starts_when_the_task_starts(engine: Engine) -> None:
    """Queued for a second behind another task, a task with a 0.5 s walltime still runs."""
    got = Collector()
    first = make_task(sleepy, 1.0)
    second = timed(make_task(square, 3), walltime=0.5)
    engine.submit(first, got.on_done, got.on_start)
    engine.submit(second, got.on_done, got.on_start)
    results = got.wait_results([first.task_id, second.task_id])
    assert value_of(results[1]) == 9


def test_a_task_with_a_walltime_travels_alone() -> None:
    got = Collector()
    tasks = [make_task(square, 1), timed(make_task(square, 2), walltime=30), make_task(square, 3)]
    pool = ProcessPoolEngine(max_workers=1)
    for t in tasks:  # queued before start: without the walltime, one chunk
        pool.submit(t, got.on_done, got.on_start)
    pool.start()
    try:
        assert [value_of(r) for r in got.wait_results([t.task_id for t in tasks])] == [1, 4, 9]
        starts = [got.started[t.task_id] for t in tasks]
        assert starts[1] not in (starts[0], starts[2])
    finally:
        pool.shutdown(wait=False)


# ------------------------------------------------------------------ retries


def test_a_task_lost_with_its_worker_runs_again_while_it_has_retries(
    pool: ProcessPoolEngine, tmp_path: Path
) -> None:
    got = Collector()
    task = timed(make_task(die_once, str(tmp_path / "once")), max_retries=1)
    pool.submit(task, got.on_done, got.on_start)
    (result,) = got.wait_results([task.task_id])
    assert value_of(result) == "second time lucky"
    (attempt,) = result.attempts
    assert "WorkerLost" in attempt.error and "exit code 3" in attempt.error
    assert attempt.at <= (result.started_at or 0)
    assert not got.duplicates


def test_without_retries_a_lost_task_fails_with_worker_lost(
    pool: ProcessPoolEngine, tmp_path: Path
) -> None:
    got = Collector()
    once = make_task(die_once, str(tmp_path / "once"))
    always = timed(make_task(die), max_retries=2)
    pool.submit(once, got.on_done, got.on_start)  # one by one: a lost chunk reruns its tasks
    (first,) = got.wait_results([once.task_id])
    pool.submit(always, got.on_done, got.on_start)
    (second,) = got.wait_results([always.task_id])
    with pytest.raises(WorkerLost, match=r"exit code 3\) \(it ran once; max_retries=0\)"):
        value_of(first)
    assert first.attempts == []
    with pytest.raises(WorkerLost, match=r"in the last of its 3 runs \(max_retries=2\)"):
        value_of(second)
    assert len(second.attempts) == 2
    _assert_runs_next(pool, got)
    assert not got.duplicates
