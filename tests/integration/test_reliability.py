"""Issue 8's promises through the public SDK, on real Redis, RabbitMQ, broker and agent processes:
cancel, walltime, retries, a task that kills the agent, endpoint deletion, a too-big result, a
malformed task, and many concurrent result streams.

Functions are defined inside the tests so dill sends them by value (the workers cannot import
this module). Markers are files in a directory the test and its tasks share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from farcall import Client, Executor
from farcall.errors import TaskTimeout
from farcall.urls import websocket_url
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration

DEADLINE = 60.0


@pytest.fixture
def one_worker(make_endpoint: Callable[..., Endpoint], client: Client) -> Endpoint:
    """A ProcessPoolEngine endpoint with one worker, so tasks queue behind each other."""
    ep = make_endpoint("one", engine_spec={"type": "ProcessPoolEngine", "max_workers": 1,
                                            "prefetch": 8})
    ep.start(client)
    return ep


def test_cancel_of_a_queued_task_means_it_never_runs(one_worker: Endpoint, client: Client,
                                                     tmp_path: Path) -> None:
    release, ran = str(tmp_path / "release"), str(tmp_path / "ran")

    def block(path: str) -> str:
        import time

        deadline = time.monotonic() + 60
        while not __import__("os").path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "released"

    def mark(path: str) -> str:
        Path(path).write_text("ran")
        return "ran"

    with Executor(endpoint_id=one_worker.endpoint_id, client=client, batch_size=1) as ex:
        blocker = ex.submit(block, release)
        wait_until(lambda: blocker.task_id is not None
                   and client.get_task(blocker.task_id)["state"] == "running", DEADLINE,
                   "the blocking task to run")
        queued = ex.submit(mark, ran)
        wait_until(lambda: queued.task_id is not None, DEADLINE, "the queued task to be sent")
        assert queued.task_id is not None and blocker.task_id is not None
        assert queued.cancel() is True
        assert queued.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(timeout=1)
        assert blocker.cancel() is False  # it is running: TaskFuture.cancel leaves it
        Path(release).write_text("go")
        assert blocker.result(timeout=DEADLINE) == "released"
        after = ex.submit(lambda: "after")  # the same single worker: it ran after `queued` would
        assert after.result(timeout=DEADLINE) == "after"
    assert not Path(ran).exists()
    assert client.get_task(queued.task_id)["state"] == "cancelled"


def test_client_cancel_stops_a_running_task_and_frees_its_worker(one_worker: Endpoint,
                                                                 client: Client) -> None:
    def nap() -> str:
        import time

        time.sleep(120)
        return "woke"

    with Executor(endpoint_id=one_worker.endpoint_id, client=client) as ex:
        long = ex.submit(nap)
        wait_until(lambda: long.task_id is not None
                   and client.get_task(long.task_id)["state"] == "running", DEADLINE,
                   "the long task to run")
        assert long.task_id is not None
        answer = client.cancel([long.task_id])
        assert answer["cancelled"] == [long.task_id]
        with pytest.raises(concurrent.futures.CancelledError):
            long.result(timeout=DEADLINE)
        assert long.cancelled()
        # the only worker was stopped and replaced: the next task runs at once
        assert ex.submit(lambda: 42).result(timeout=DEADLINE) == 42
    with pytest.raises(concurrent.futures.CancelledError):
        client.get_result(long.task_id)


def test_walltime_fails_the_task_and_frees_the_worker(one_worker: Endpoint, client: Client) -> None:
    def nap() -> str:
        import time

        time.sleep(120)
        return "woke"

    with Executor(endpoint_id=one_worker.endpoint_id, client=client, walltime=1.0) as ex:
        late = ex.submit(nap)
        with pytest.raises(TaskTimeout) as err:
            late.result(timeout=DEADLINE)
        assert isinstance(err.value, TimeoutError)
        assert ex.submit(lambda: "next").result(timeout=DEADLINE) == "next"
    assert late.task_id is not None
    assert client.get_task(late.task_id)["state"] == "failed"


def test_run_with_walltime_through_the_client(one_worker: Endpoint, client: Client) -> None:
    def nap() -> None:
        import time

        time.sleep(120)

    function_id = client.register_function(nap)
    task_id = client.run(endpoint_id=one_worker.endpoint_id, function_id=function_id, walltime=0.5)
    wait_until(lambda: client.get_task(task_id)["state"] == "failed", DEADLINE, "the timeout")
    with pytest.raises(TaskTimeout):
        client.get_result(task_id)


def test_max_retries_reruns_a_task_lost_with_its_worker(one_worker: Endpoint, client: Client,
                                                       tmp_path: Path) -> None:
    def crash_once(marker: str) -> str:
        import os

        if not os.path.exists(marker):
            Path(marker).write_text("crashed")
            os._exit(3)
        return "second time lucky"

    with Executor(endpoint_id=one_worker.endpoint_id, client=client, max_retries=1) as ex:
        lucky = ex.submit(crash_once, str(tmp_path / "once"))
        assert lucky.result(timeout=DEADLINE) == "second time lucky"
    assert lucky.task_id is not None
    attempts = client.get_task(lucky.task_id)["attempts"]
    assert len(attempts) == 1 and "lost" in attempts[0]["error"]

    with Executor(endpoint_id=one_worker.endpoint_id, client=client) as ex:
        unlucky = ex.submit(crash_once, str(tmp_path / "again"))
        with pytest.raises(Exception, match="lost") as err:
            unlucky.result(timeout=DEADLINE)
        assert not isinstance(err.value, concurrent.futures.CancelledError)


def test_a_task_that_kills_the_agent_fails_after_three_crashes(
    make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    """ThreadPoolEngine runs tasks inside the agent: os._exit there kills the agent itself.
    Restarted each time (as systemd would), the agent must not get the task for ever."""
    ep = make_endpoint("threads", engine_spec={"type": "ThreadPoolEngine", "max_workers": 2})
    ep.start(client)

    def kill_agent() -> None:
        import os

        os._exit(9)

    def agent_gone_or_task_done() -> bool:
        assert ep.proc is not None
        return poison.done() or not ep.proc.alive()

    with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
        poison = ex.submit(kill_agent)
        for _ in range(4):  # it dies with the task three times; the fourth agent fails it
            wait_until(agent_gone_or_task_done, DEADLINE, "the agent to die or the task to fail")
            if poison.done():
                break
            ep.spawn()
        with pytest.raises(Exception, match="died 3 times"):
            poison.result(timeout=DEADLINE)
        # the agent that failed it keeps serving
        assert ex.submit(lambda: "alive").result(timeout=DEADLINE) == "alive"
    assert poison.task_id is not None
    assert len(client.get_task(poison.task_id)["attempts"]) == 3


def test_deleting_an_endpoint_fails_the_tasks_waiting_for_it(
    make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    ep = make_endpoint("doomed")
    eid = ep.start(client)
    ep.stop()
    wait_until(lambda: client.get_endpoint_status(eid)["status"] == "offline", DEADLINE, "offline")
    with Executor(endpoint_id=eid, client=client) as ex:
        futures = [ex.submit(pow, 2, i) for i in range(5)]
        wait_until(lambda: all(f.task_id for f in futures), DEADLINE, "the tasks to be queued")
        client.delete_endpoint(eid)
        for f in futures:
            with pytest.raises(Exception, match="was deleted"):
                f.result(timeout=DEADLINE)


def test_a_deep_resource_specification_is_refused_and_nothing_stalls(endpoint: Endpoint,
                                                                     client: Client) -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(250):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(ValueError, match="nested deeper"):
        Executor(endpoint_id=endpoint.endpoint_id, client=client, resource_specification=deep)
    headers = {"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"}
    for depth in (250, 600, 5000):  # what a client other than the SDK might send
        nested = '{"a":' * depth + "{}" + "}" * depth
        body = (f'{{"endpoint_id": "{endpoint.endpoint_id}", "tasks": [{{"function_id": "x", '
                f'"args": "A", "resource_specification": {nested}}}]}}')
        r = httpx.post(f"{client.broker_url}/v1/tasks", content=body, headers=headers, timeout=30)
        assert r.status_code in (400, 422), r.text
        assert "nested" in r.json()["message"] or "nested" in r.text, r.text
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(pow, 2, 10).result(timeout=DEADLINE) == 1024


def test_two_hundred_result_streams_leave_the_broker_serving(
    broker: Broker, endpoint: Endpoint, client: Client
) -> None:
    """Each stream used to hold a Redis connection; 100 exhausted the pool for everyone."""
    streams = 200
    groups = [client.create_task_group() for _ in range(streams)]
    function_id = client.register_function(pow)
    headers = {"Authorization": f"Bearer {client.token}"}

    async def one(group: str, ready: asyncio.Event, opened: list[int]) -> Any:
        from websockets.asyncio.client import connect

        url = websocket_url(broker.url, f"/task_groups/{group}/results")
        async with connect(url, additional_headers=headers, max_size=None) as ws:
            opened.append(1)
            await ready.wait()
            await ws.send(json.dumps({"type": "submit", "request_id": 1, "batch": {
                "endpoint_id": endpoint.endpoint_id, "task_group_id": group,
                "tasks": [{"function_id": function_id, "args": _args(2, 5)}]}}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
                if frame["type"] == "results":
                    return frame["results"][0]["state"]
                assert frame["type"] == "submitted", frame

    async def all_streams() -> list[Any]:
        ready, opened = asyncio.Event(), list[int]()
        tasks = [asyncio.create_task(one(g, ready, opened)) for g in groups]
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while len(opened) < streams:
            assert asyncio.get_running_loop().time() < deadline, f"{len(opened)} streams opened"
            for t in [t for t in tasks if t.done()]:
                t.result()  # re-raise a failed connect
            await asyncio.sleep(0.05)
        # all streams are open: the broker must still answer REST and health
        async with httpx.AsyncClient(base_url=broker.url, headers=headers, timeout=10) as http:
            assert (await http.get("/v1/endpoints")).status_code == 200
            assert (await http.get("/v1/health")).json()["status"] == "ok"
        ready.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(all_streams()) == ["success"] * streams


def _args(*args: Any) -> str:
    from farcall.serialize import pack_args

    return pack_args(args, {})
