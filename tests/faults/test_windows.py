"""Faults aimed at narrow windows: the broker ``kill -9``-ed the instant a chosen write lands in
Redis (``harness.faults.KillOnWrite``), then restarted as a supervisor would.

- between recording a batch and queueing it: nothing is stranded, and the client's retry of
  the cut-off submission creates no second set of tasks;
- right after a timer claimed a run: the run gets its one task (the requeue sweep submits it);
- inside ``POST /run`` of the Action Provider API, after its tasks were created: the action ends
  in the truth (the task ran, its output shows), and the same ``request_id`` can be resent.

Each deployment has a Redis of its own (the hook pauses its writes for the moment of the kill)
and sweeps after 2 s (``FARCALL_REQUEUE_AFTER``) so a test need not wait 10.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from farcall import Executor
from harness.faults import KillOnWrite, recording_task
from harness.private_services import PrivateRedis
from harness.procs import wait_until
from tests.faults.helpers import Deployment

pytestmark = pytest.mark.integration

SWEEP = {"FARCALL_REQUEUE_AFTER": "2"}
TASKS = 20
DEADLINE = 90.0
AIMS = 5
"""Tries at a window the kill may miss on a busy machine (each a new submission)."""


def restart_broker(dep: Deployment, watch: KillOnWrite) -> None:
    """Once ``watch`` killed the broker: reap it and start it again on the same port."""
    watch.wait(60)
    dep.broker.proc.stop(timeout=10, sig=signal.SIGKILL)
    dep.broker.start()


def ran(calls: Path) -> list[str]:
    """The call ids the recording task wrote, one per run."""
    return calls.read_text().split() if calls.exists() else []


def open_tasks_key(dep: Deployment) -> str:
    """The Redis key of the user's open-task count (changed by every batch)."""
    with dep.client() as c:
        user_id = c.whoami()["identity_id"]
    return f"{dep.redis_prefix}user:{user_id}:open"


def test_a_broker_killed_between_recording_and_queueing_strands_nothing(
    deployment: Callable[..., Deployment], private_redis: PrivateRedis, tmp_path: Path
) -> None:
    dep = deployment(name="submit-window", settings=SWEEP, redis_url=private_redis.url).start()
    ep = dep.endpoint("submit-window")
    eid = dep.start_endpoint(ep)
    ep.stop()  # offline: the batch must go through the queue
    key = open_tasks_key(dep)
    calls = tmp_path / "calls"
    task = recording_task(str(calls), 0.0)
    with dep.client(retry_seconds=60) as client, Executor(
        endpoint_id=eid, client=client, batch_size=TASKS
    ) as ex:
        with KillOnWrite(dep.redis_url, lambda r: r.get(key), dep.broker.proc.pid) as watch:
            futures = [ex.submit(task, i) for i in range(TASKS)]
            restart_broker(dep, watch)
        ep.spawn()
        results = [f.result(DEADLINE) for f in futures]
    assert results == [2 * i for i in range(TASKS)]
    runs = ran(calls)
    assert sorted(map(int, runs)) == list(range(TASKS)), f"each task ran once: {sorted(runs)}"
    with dep.client() as c:
        assert c.get_endpoint_status(eid)["queued_tasks"] == 0
    assert int(redis_value(dep.redis_url, key)) == 0, "no open task left"


def redis_value(redis_url: str, key: str) -> Any:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        return r.get(key)
    finally:
        r.close()


def test_a_broker_killed_after_a_timer_claimed_a_run(
    deployment: Callable[..., Deployment], private_redis: PrivateRedis, tmp_path: Path
) -> None:
    dep = deployment(name="timer-window", settings=SWEEP, redis_url=private_redis.url).start()
    ep = dep.endpoint("timer-window")
    eid = dep.start_endpoint(ep)
    calls = tmp_path / "calls"
    with dep.client() as c:
        fid = c.register_function(recording_task(str(calls), 0.0))
        timer_id = c.create_timer(eid, fid, (7,), interval=1.0, stop_after_runs=3,
                                  start=time.time() + 1)
    key = f"{dep.redis_prefix}timer:{timer_id}"
    with KillOnWrite(dep.redis_url, lambda r: r.hget(key, "run_count"), dep.broker.proc.pid) as w:
        restart_broker(dep, w)

    with dep.client(retry_seconds=30) as c:
        def every_run_ran() -> list[dict[str, Any]] | None:
            runs: list[dict[str, Any]] = c.get_timer(timer_id)["runs"]
            done = len(runs) == 3 and all(
                r["task_id"] and c.get_task(r["task_id"])["state"] == "success" for r in runs)
            return runs if done else None

        runs = wait_until(every_run_ran, DEADLINE, "the timer's 3 runs to have run their tasks")
        assert [r["number"] for r in runs] == [1, 2, 3] and not any(r["error"] for r in runs)
        assert all(c.get_result(r["task_id"]) == 14 for r in runs)
    assert ran(calls) == ["7"] * 3, "one task per run, each ran once"


def test_a_broker_killed_inside_an_actions_run_ends_in_the_truth(
    deployment: Callable[..., Deployment], private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """The window (tasks created, the action not yet told) is short: if the kill lands after
    the answer (a busy machine), the aim missed and is taken again with a new action."""
    dep = deployment(name="action-window", settings=SWEEP, redis_url=private_redis.url).start()
    ep = dep.endpoint("action-window")
    eid = dep.start_endpoint(ep)
    calls = tmp_path / "calls"
    with dep.client() as c:
        fid = c.register_function(recording_task(str(calls), 0.0))
    key = open_tasks_key(dep)
    http = httpx.Client(base_url=f"{dep.broker.url}/action-provider", timeout=30,
                        headers={"Authorization": f"Bearer {dep.token}"})
    try:
        for aim in range(1, AIMS + 1):
            request = {"request_id": f"window-{uuid.uuid4().hex[:8]}",
                       "body": {"endpoint_id": eid, "tasks": [{"function_id": fid,
                                                               "args": [aim]}]}}
            with KillOnWrite(dep.redis_url, lambda r: r.get(key), dep.broker.proc.pid) as watch:
                try:
                    http.post("/run", json=request)
                    hit = False
                except httpx.TransportError:
                    hit = True
                restart_broker(dep, watch)
            if hit:
                break
        else:
            pytest.fail(f"the kill never landed inside POST /run in {AIMS} aims")
        again = http.post("/run", json=request)
        assert again.status_code == 200, again.text
        action_id = again.json()["action_id"]

        def ended() -> dict[str, Any] | None:
            status: dict[str, Any] = http.get(f"/{action_id}/status").json()
            return status if status["status"] != "ACTIVE" else None

        final = wait_until(ended, DEADLINE, f"action {action_id} to end")
    finally:
        http.close()
    assert final["status"] == "SUCCEEDED", final
    assert final["details"]["result"] == [2 * aim]
    assert ran(calls).count(str(aim)) == 1, "the action's one task ran once"
