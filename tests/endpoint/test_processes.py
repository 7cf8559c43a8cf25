"""The process pool on a shared endpoint: a worker process runs the tasks of one user only, and
users share ``max_workers`` (farcall.endpoint.engines.processes)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from farcall.endpoint.engines.processes import TURN_SECONDS, ProcessPoolEngine
from farcall.protocol.channel import TaskMessage
from harness.procs import wait_until
from tests.endpoint.helpers import Collector, make_task, value_of


def task_of(user: str, fn: Callable[..., Any], *args: Any) -> TaskMessage:
    return make_task(fn, *args).model_copy(update={"user_id": user})


def implant(user: str, seconds: float = 0.0) -> tuple[int, str | None]:
    """What an attacker's task does: leave a mark in its worker; and what any task sees."""
    import builtins
    import os
    import time

    seen = getattr(builtins, "farcall_implant", None)
    builtins.farcall_implant = user  # type: ignore[attr-defined]
    time.sleep(seconds)
    return os.getpid(), seen


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ProcessPoolEngine]]:
    started: list[ProcessPoolEngine] = []

    def make(**options: Any) -> ProcessPoolEngine:
        engine = ProcessPoolEngine(**options)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.shutdown(wait=False)


def run_all(engine: ProcessPoolEngine, tasks: list[TaskMessage],
            timeout: float = 60) -> dict[str, Any]:
    got = Collector()
    for t in tasks:
        engine.submit(t, got.on_done, got.on_start)
    results = got.wait_results([t.task_id for t in tasks], timeout)
    return {r.task_id: value_of(r) for r in results}


def test_a_worker_never_runs_tasks_of_two_users(
    make_pool: Callable[..., ProcessPoolEngine]
) -> None:
    """Three users on two workers, their tasks interleaved: every worker process ran one user's
    tasks, and no task met another user's mark."""
    engine = make_pool(max_workers=2, worker_idle_seconds=0.1)
    tasks = [task_of(user, implant, user, 0.02) for _ in range(6) for user in ("ann", "bob", "cy")]
    values = run_all(engine, tasks)
    users_of_pid: dict[int, set[str]] = collections.defaultdict(set)
    for t in tasks:
        pid, seen = values[t.task_id]
        users_of_pid[pid].add(t.user_id)
        assert seen in (None, t.user_id), f"{t.user_id}'s task met {seen}'s implant"
    assert all(len(users) == 1 for users in users_of_pid.values()), users_of_pid
    assert {u for users in users_of_pid.values() for u in users} == {"ann", "bob", "cy"}
    assert engine.status().workers <= 2


def test_an_idle_users_worker_is_replaced_for_another_user(
    make_pool: Callable[..., ProcessPoolEngine]
) -> None:
    """One worker: the first user's worker, idle, gives way to a fresh one for the next user
    (without per-user workers the second task would run in the same process, implant and all)."""
    engine = make_pool(max_workers=1, worker_idle_seconds=0.2)
    (first,) = run_all(engine, [task_of("ann", implant, "ann")]).values()
    (second,) = run_all(engine, [task_of("bob", implant, "bob")]).values()
    (again,) = run_all(engine, [task_of("bob", implant, "bob")]).values()
    assert second[1] is None and second[0] != first[0]
    assert again == (second[0], "bob"), "a user's own tasks keep their worker"
    assert engine.status().workers == 1


def test_one_users_backlog_does_not_shut_out_another(
    make_pool: Callable[..., ProcessPoolEngine]
) -> None:
    """Ann's long backlog holds both workers; Bob's few tasks get a worker of their own within
    a turn, long before Ann's backlog ends."""
    engine = make_pool(max_workers=2, worker_idle_seconds=0.2)
    got = Collector()
    ann = [task_of("ann", implant, "ann", 0.05) for _ in range(4 * int(TURN_SECONDS / 0.05))]
    for t in ann:
        engine.submit(t, got.on_done)
    wait_until(lambda: engine.status().idle_workers == 0, 30, "Ann's tasks on both workers")
    bob = [task_of("bob", implant, "bob", 0.05) for _ in range(4)]
    for t in bob:
        engine.submit(t, got.on_done)
    got.wait_results([t.task_id for t in ann + bob], 120)
    done_at = {t: r.finished_at or 0.0 for t, r in got.results.items()}
    assert max(done_at[t.task_id] for t in bob) < max(done_at[t.task_id] for t in ann)
    ann_pids = {value_of(got.results[t.task_id])[0] for t in ann}
    bob_runs = [value_of(got.results[t.task_id]) for t in bob]
    assert not ann_pids & {pid for pid, _ in bob_runs}
    assert all(seen in (None, "bob") for _, seen in bob_runs)


def test_one_user_keeps_every_worker_as_before(
    make_pool: Callable[..., ProcessPoolEngine]
) -> None:
    """A single user's endpoint: no worker is ever replaced."""
    engine = make_pool(max_workers=2, worker_idle_seconds=0.0)
    first = run_all(engine, [task_of("ann", implant, "ann", 0.05) for _ in range(8)])
    pids = {engine_pid for engine_pid, _ in first.values()}
    later = run_all(engine, [task_of("ann", implant, "ann", 0.05) for _ in range(8)])
    assert {pid for pid, _ in later.values()} <= pids and len(pids) == 2


def test_engines_that_share_workers_between_users_say_so() -> None:
    """The agent warns at start (``Engine.shared_caveat``) for engines without a worker per user."""
    from farcall.endpoint.engines.parsl import ParslEngine
    from farcall.endpoint.engines.threads import ThreadPoolEngine

    assert "agent's own process" in ThreadPoolEngine.shared_caveat
    assert "several users" in ParslEngine.shared_caveat
    assert ProcessPoolEngine.shared_caveat == ""
