"""The engines' one failure policy (``engines/policy.py``) on ParslEngine (LocalProvider):
cancel, walltime, retries.

One engine (one block, one worker) serves the module: Parsl is slow to start. Parsl
cannot stop a task it was handed, so a cancelled running task is answered at once
and its later result dropped; a walltime is enforced inside the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

from farcall.endpoint.engines import build_engine
from farcall.endpoint.engines.parsl import ParslEngine
from farcall.endpoint.errors import WorkerLost
from farcall.errors import TaskTimeout
from harness.procs import wait_until
from tests.endpoint.helpers import Collector, make_task, value_of
from tests.endpoint.test_policy import Cancelled, timed

FAST = {"strategy_period": 0.2, "heartbeat_period": 1, "heartbeat_threshold": 5}


def _functions() -> SimpleNamespace:
    """The tasks, as local functions: sent by value, since Parsl workers cannot import tests."""

    def hold(marker: str, gate: str) -> None:
        import os
        import time

        open(marker, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.01)

    def mark(marker: str) -> None:
        open(marker, "w").close()

    def square(x: int) -> int:
        return x * x

    def sleepy(seconds: float) -> None:
        import time

        time.sleep(seconds)

    def die_once(marker: str) -> str:
        import os

        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        return "second time lucky"

    return SimpleNamespace(hold=hold, mark=mark, square=square, sleepy=sleepy, die_once=die_once)


fn = _functions()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ParslEngine]:
    e = build_engine({
        "type": "ParslEngine", "run_dir": str(tmp_path_factory.mktemp("runinfo")), **FAST,
        "provider": {"type": "LocalProvider", "init_blocks": 1, "min_blocks": 1, "max_blocks": 1},
        "max_workers_per_node": 1,
    })
    assert isinstance(e, ParslEngine)
    e.start()
    yield e
    e.shutdown(wait=False)


def _idle(engine: ParslEngine) -> None:
    """Wait until no Parsl task is out: a dropped result would have come by then."""
    wait_until(lambda: engine._inflight == 0 and not engine._pending, 60, "Parsl tasks to finish")


def _assert_runs_next(engine: ParslEngine, got: Collector) -> None:
    after = make_task(fn.square, 12)
    engine.submit(after, got.on_done, got.on_start)
    assert value_of(got.wait_results([after.task_id], 60)[0]) == 144


def test_walltime_fails_the_task_with_task_timeout_and_frees_its_worker(engine: ParslEngine) -> None:
    got = Collector()
    task = timed(make_task(fn.sleepy, 30), walltime=0.5)
    engine.submit(task, got.on_done, got.on_start)
    (result,) = got.wait_results([task.task_id], timeout=25)  # the worker stopped it, not the end
    with pytest.raises(TaskTimeout, match=rf"task {task.task_id} ran past its walltime of 0.5 s"):
        value_of(result)
    assert "in sleepy" in result.error  # raised inside the function
    _assert_runs_next(engine, got)
    assert not got.duplicates


def test_a_lost_task_runs_again_while_it_has_retries(engine: ParslEngine, tmp_path: Path) -> None:
    got = Collector()
    retried = timed(make_task(fn.die_once, str(tmp_path / "once")), max_retries=1)
    engine.submit(retried, got.on_done, got.on_start)
    (result,) = got.wait_results([retried.task_id], 60)
    assert value_of(result) == "second time lucky"
    (attempt,) = result.attempts
    assert "WorkerLost" in attempt.error and "Parsl worker" in attempt.error

    not_retried = make_task(fn.die_once, str(tmp_path / "again"))
    engine.submit(not_retried, got.on_done, got.on_start)
    (result,) = got.wait_results([not_retried.task_id], 60)
    with pytest.raises(WorkerLost, match=r"\(it ran once; max_retries=0\)"):
        value_of(result)
    assert not got.duplicates


def test_cancel_of_a_running_task_answers_at_once_and_drops_its_result(
    engine: ParslEngine, tmp_path: Path
) -> None:
    got = Collector()
    gate = tmp_path / "gate"
    running = make_task(fn.hold, str(tmp_path / "pid"), str(gate))
    engine.submit(running, got.on_done, got.on_start)
    wait_until((tmp_path / "pid").exists, 60, "the task to run")
    engine.cancel([running.task_id, "no-such-task"], Cancelled("stop it"))
    (result,) = got.wait_results([running.task_id], timeout=0)
    with pytest.raises(Cancelled, match="stop it"):
        value_of(result)
    gate.touch()  # Parsl cannot stop it: it finishes, and its result is dropped
    _idle(engine)
    assert got.results[running.task_id] is result and not got.duplicates
    assert engine.status().pending_tasks == 0 and engine._outstanding == 0


def test_cancel_of_a_task_still_in_farcalls_queue_drops_it(
    engine: ParslEngine, tmp_path: Path
) -> None:
    """Short tasks wait in farcall's queue while two Parsl tasks per worker are out."""
    got = Collector()
    gate = tmp_path / "gate"
    engine._durations.mean = 1e-4  # what the engine learns from short tasks: it holds tasks back
    holders = [make_task(fn.hold, str(tmp_path / f"pid{i}"), str(gate)) for i in range(2)]

    def out(n: int) -> bool:
        return engine._inflight == n and not engine._pending

    for n, task in enumerate(holders, 1):  # one by one, so each goes out as a Parsl task
        engine.submit(task, got.on_done, got.on_start)
        wait_until(partial(out, n), 30, f"{n} Parsl task(s) out")
    queued = make_task(fn.mark, str(tmp_path / "ran"))
    engine.submit(queued, got.on_done, got.on_start)
    assert [e.task_id for e in engine._pending] == [queued.task_id]

    engine.cancel([queued.task_id], Cancelled("not wanted"))
    assert not engine._pending
    with pytest.raises(Cancelled, match="not wanted"):
        value_of(got.wait_results([queued.task_id], timeout=0)[0])
    gate.touch()
    got.wait_results([t.task_id for t in holders], 60)
    _idle(engine)
    _assert_runs_next(engine, got)
    assert not (tmp_path / "ran").exists() and not got.duplicates
