"""The walltime watchdog alone: a run past its walltime is expired once; a finished task,
or one run again since, is not; finished tasks do not pile up in its heap."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from farcall.endpoint.engines import watchdog as watchdog_module
from farcall.endpoint.engines.watchdog import WalltimeWatchdog


@dataclass(eq=False)
class Task:
    """A watched task; the watchdog holds it weakly, so each test keeps its own."""

    task_id: str
    walltime: float | None
    started: float | None = None
    done: bool = False


class Expired:
    """The ``expire`` callback: records each call, lets tests wait for one."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, task: Task) -> None:
        with self._cond:
            self.calls.append(task.task_id)
            self._cond.notify_all()

    def wait_for(self, task_id: str, timeout: float = 10) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: task_id in self.calls, timeout), (
                f"{task_id} was not expired within {timeout} s (expired: {self.calls})")


@pytest.fixture
def expired() -> Expired:
    return Expired()


@pytest.fixture
def watchdog(expired: Expired) -> Iterator[WalltimeWatchdog[Task]]:
    w: WalltimeWatchdog[Task] = WalltimeWatchdog(expired, name="test")
    yield w
    w.stop()


def start(watchdog: WalltimeWatchdog[Task], task: Task, at: float) -> None:
    task.started = at
    watchdog.watch(task, at)


def test_a_run_past_its_walltime_is_expired_once(
    watchdog: WalltimeWatchdog[Task], expired: Expired
) -> None:
    late = Task("late", walltime=0.05)
    start(watchdog, late, time.time() - 10)  # started long ago: due now
    expired.wait_for("late")
    later = Task("later", walltime=0.05)
    start(watchdog, later, time.time())  # due after "late" was looked at
    expired.wait_for("later")
    assert expired.calls == ["late", "later"]
    assert len(watchdog) == 0


def test_a_finished_task_or_an_earlier_run_is_not_expired(
    watchdog: WalltimeWatchdog[Task], expired: Expired
) -> None:
    finished = Task("finished", walltime=0.05)
    rerun = Task("rerun", walltime=0.05)
    start(watchdog, finished, time.time())
    start(watchdog, rerun, time.time())
    finished.done = True
    rerun.started = time.time() + 3600  # run again: the first run's deadline no longer counts
    sentinel = Task("sentinel", walltime=0.1)
    start(watchdog, sentinel, time.time())  # due after both
    expired.wait_for("sentinel")
    assert expired.calls == ["sentinel"]


def test_the_grace_comes_on_top_of_the_walltime(expired: Expired) -> None:
    watchdog: WalltimeWatchdog[Task] = WalltimeWatchdog(expired, grace=3600)
    try:
        graced, ungraced = Task("graced", walltime=0.01), Task("ungraced", walltime=0.01)
        start(watchdog, graced, time.time() - 10)
        start(watchdog, ungraced, time.time() - 3700)
        expired.wait_for("ungraced")
        assert expired.calls == ["ungraced"]
    finally:
        watchdog.stop()


def test_finished_tasks_are_compacted_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog_module, "COMPACT_DEADLINES", 8)
    w: WalltimeWatchdog[Task] = WalltimeWatchdog(lambda t: None)
    keep = [Task(f"k{i}", walltime=3600) for i in range(3)]
    for task in keep:
        start(w, task, time.time())
    for i in range(100):
        task = Task(f"t{i}", walltime=3600)
        start(w, task, time.time())
        task.done = True
    # compacted whenever it reached 8 (COMPACT_DEADLINES, or twice what the last left)
    assert len(keep) <= len(w) <= 8
    w.stop()


def test_a_failing_expire_does_not_end_the_watchdog(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    done = threading.Event()

    def expire(task: Task) -> None:
        seen.append(task.task_id)
        if task.task_id == "first":
            raise RuntimeError("engine bug")
        done.set()

    w: WalltimeWatchdog[Task] = WalltimeWatchdog(expire)
    try:
        first, second = Task("first", walltime=0.01), Task("second", walltime=0.05)
        start(w, first, time.time() - 10)
        start(w, second, time.time())
        assert done.wait(10)
        assert seen == ["first", "second"]
        assert "stopping task first at its walltime failed" in caplog.text
    finally:
        w.stop()
