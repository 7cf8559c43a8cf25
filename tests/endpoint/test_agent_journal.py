"""The crash journal: a task that kills the agent process is reported once by the next start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from farcall.endpoint import daemon
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.journal import CrashJournal, read_crashed
from tests.endpoint.fake_broker import CREDENTIAL, ENDPOINT_ID, FakeBroker
from tests.endpoint.helpers import make_task, value_of

REPO = Path(__file__).resolve().parents[2]


def double(x: int) -> int:
    return 2 * x


def exit_now(code: int) -> None:
    """Task body: end the whole process at once, as a crashing extension would."""
    import os

    os._exit(code)


# ------------------------------------------------------------------ the file


def test_started_and_not_finished_ids_are_the_crashed_ones(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = CrashJournal(path)
    assert journal.open() == []
    for task_id in ("a", "b", "c"):
        journal.started(task_id)
    journal.finished(["b", "never-started"])
    assert read_crashed(path) == ["a", "c"]
    journal.close()
    assert read_crashed(path) == [], "a clean exit empties the journal"
    other = tmp_path / "other"
    other.write_bytes(b"+a\n+b\n-b\n+torn" + bytes(100))  # a line cut short, then the unused tail
    assert read_crashed(other) == ["a"]


def test_the_journal_stays_small_and_keeps_the_running_ids(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = CrashJournal(path, max_bytes=4096)
    journal.open()
    journal.started("long-1")
    journal.started("long-2")
    for i in range(5000):
        journal.started(f"task-{i:08d}")
        journal.finished([f"task-{i:08d}"])
    assert path.stat().st_size <= 4096
    assert sorted(read_crashed(path)) == ["long-1", "long-2"]
    journal.close()


def test_crashed_ids_stay_until_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(b"+a\n+b\n-b\n")
    journal = CrashJournal(path, max_bytes=4096)
    assert journal.open() == ["a"]
    journal.started("c")
    assert read_crashed(path) == ["a", "c"], "kept until the broker has them"
    journal.forget_crashed()
    assert read_crashed(path) == ["c"]
    journal.started("a")  # the crashed task, delivered again, runs here
    for i in range(2000):  # enough to remake the file a few times
        journal.started(f"t{i}")
        journal.finished([f"t{i}"])
    assert read_crashed(path) == ["c", "a"]
    journal.close()


# ------------------------------------------------------------------ the agent


def test_the_first_hello_carries_the_crashed_ids_once(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    path = tmp_path / daemon.JOURNAL_FILE
    path.write_bytes(b"+crashed-1\n+done\n-done\n+crashed-2\n")
    runner = start_agent(journal_path=path)
    hello = broker.wait(lambda: broker.hello(1), 10, "hello")
    assert hello.crashed_task_ids == ["crashed-1", "crashed-2"]
    assert read_crashed(path) == []
    task = make_task(double, 4)
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.result_ids(), 10, "a result")
    lines = path.read_bytes().rstrip(b"\0").splitlines()  # the file's unused tail is zeros
    assert lines == [b"+" + task.task_id.encode(), b"-" + task.task_id.encode()]
    broker.drop()
    hello = broker.wait(lambda: broker.hello(2), 10, "hello on connection 2")
    assert hello.crashed_task_ids == []
    runner.stop(timeout=30)
    assert path.read_bytes() == b""


def test_without_a_journal_the_hello_says_no_crashes(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    start_agent()
    hello = broker.wait(lambda: broker.hello(1), 10, "hello")
    assert hello.crashed_task_ids == []
    assert list(tmp_path.iterdir()) == []


AGENT = """
import sys
from pathlib import Path
from farcall.endpoint import daemon
from farcall.endpoint.agent import Agent
from farcall.endpoint.engines import build_engine

url, endpoint_id, credential, directory = sys.argv[1:5]
engine = build_engine({"type": "ThreadPoolEngine", "max_workers": 2})
agent = Agent(url, endpoint_id, credential, engine, heartbeat_period=0.2, max_backoff=0.3)
daemon.run_agent(agent, Path(directory))
"""


def test_a_task_that_kills_the_agent_is_reported_by_the_next_agent(
    broker: FakeBroker, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", AGENT, broker.url, ENDPOINT_ID, CREDENTIAL, str(tmp_path)]
    first = subprocess.Popen(command, env=env, cwd=REPO)
    second: subprocess.Popen[bytes] | None = None
    try:
        broker.wait(lambda: broker.hello(1), 20, "the first agent's hello")
        killer = make_task(exit_now, 7)
        broker.send_tasks([killer])
        assert first.wait(20) == 7
        second = subprocess.Popen(command, env=env, cwd=REPO)
        hello = broker.wait(lambda: broker.hello(2), 20, "the second agent's hello")
        assert hello.crashed_task_ids == [killer.task_id]
        task = make_task(double, 5)
        broker.send_tasks([task])
        broker.wait(lambda: task.task_id in broker.result_ids(), 20, "the second agent serves")
        assert value_of(broker.results()[-1]) == 10
        second.terminate()  # SIGTERM: a graceful stop
        assert second.wait(30) == 0
        assert read_crashed(tmp_path / daemon.JOURNAL_FILE) == []
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
