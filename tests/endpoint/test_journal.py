"""The crash journal's file: running ids kept across a crash, the file kept small.

How the agent reports them (once, in the next Hello) is ``test_agent.py``'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from farcall.endpoint.journal import CrashJournal, read_crashed

REPO = Path(__file__).resolve().parents[2]


def double(x: int) -> int:
    return 2 * x


def exit_now(code: int) -> None:
    """Task body: end the whole process at once, as a crashing extension would."""

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
