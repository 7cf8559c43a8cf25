"""The whole path SDK -> broker -> endpoint -> worker -> result, on real Redis and RabbitMQ.

Functions are defined inside the tests so dill sends them by value, as it does
for notebook functions: the endpoint's workers cannot import this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import traceback
import uuid
from concurrent.futures import as_completed, wait
from pathlib import Path
from typing import Any

import httpx
import pytest

from farcall import Client, Executor
from farcall.errors import NotFound, TaskPending
from harness import BIN
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration


def test_thousand_tasks_through_one_executor(endpoint: Endpoint, client: Client) -> None:
    def square(x: int) -> int:
        return x * x

    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        futures = [ex.submit(square, i) for i in range(1000)]
        done, not_done = wait(futures, timeout=120)
    assert not not_done
    assert [f.result() for f in futures] == [i * i for i in range(1000)]


def test_as_completed_and_map_preserves_order(endpoint: Endpoint, client: Client) -> None:
    def slow_inverse(i: int) -> int:
        import time

        time.sleep(0.002 * (20 - i))  # later items finish first
        return -i

    with Executor(endpoint_id=endpoint.endpoint_id, client=client, batch_size=4) as ex:
        assert list(ex.map(slow_inverse, range(20), timeout=60)) == [-i for i in range(20)]
        futures = [ex.submit(slow_inverse, i) for i in range(5)]
        assert sorted(f.result() for f in as_completed(futures, timeout=60)) == [-4, -3, -2, -1, 0]


def test_main_closure_runs_remotely(endpoint: Endpoint, broker: Broker, token: str, tmp_path: Path) -> None:
    script = tmp_path / "notebook.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from farcall import Executor

            def make_scaler(factor):
                offset = 7
                def scale(x):
                    return x * factor + offset
                return scale

            with Executor(endpoint_id=os.environ["EP"]) as ex:
                print("RESULT", ex.submit(make_scaler(3), 5).result(timeout=60))
            """
        )
    )
    env = dict(broker.env, FARCALL_BROKER_URL=broker.url, FARCALL_TOKEN=token, EP=endpoint.endpoint_id)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RESULT 22" in done.stdout


def test_remote_value_error_is_reraised_with_remote_frame(endpoint: Endpoint, client: Client) -> None:
    def explode_remotely(x: int) -> None:
        raise ValueError(f"bad value {x}")

    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(explode_remotely, 41)
        with pytest.raises(ValueError, match="bad value 41") as info:
            future.result(timeout=60)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "explode_remotely" in frames
    printed = "".join(traceback.format_exception(info.value))
    assert "explode_remotely" in printed


def test_client_run_and_get_result(endpoint: Endpoint, client: Client) -> None:
    def add(a: int, b: int = 0) -> int:
        return a + b

    function_id = client.register_function(add)
    task_id = client.run(2, endpoint_id=endpoint.endpoint_id, function_id=function_id, b=40)
    assert wait_until(lambda: _result_or_none(client, task_id), 60, "run result") == 42
    task = client.get_task(task_id)
    assert task["state"] == "success"
    for state in ("received", "waiting-for-endpoint", "running", "success"):
        assert state in task["transitions"], task["transitions"]
    stamps = [task["transitions"][s] for s in ("received", "waiting-for-endpoint", "running", "success")]
    assert stamps == sorted(stamps)

    batch = client.create_batch()
    for i in range(10):
        batch.add(function_id, args=(i,), kwargs={"b": 1})
    submitted = client.batch_run(endpoint.endpoint_id, batch)
    task_ids = submitted["task_ids"] if isinstance(submitted, dict) else submitted
    assert len(task_ids) == 10

    def all_done() -> dict[str, Any] | None:
        res = client.get_batch_result(task_ids)
        return res if not any(r["pending"] for r in res.values()) else None

    results = wait_until(all_done, 60, "batch results")
    assert [results[t]["result"] for t in task_ids] == [i + 1 for i in range(10)]


def _result_or_none(client: Client, task_id: str) -> Any:
    try:
        return client.get_result(task_id)
    except TaskPending:
        return None


def test_tasks_wait_while_endpoint_offline_and_id_survives_restart(
    make_endpoint: Any, client: Client
) -> None:
    ep = make_endpoint("offline")
    first_id = ep.start(client)
    ep.stop()
    wait_until(lambda: client.get_endpoint_status(first_id)["status"] == "offline", 30, "offline")

    def triple(x: int) -> int:
        return 3 * x

    ex = Executor(endpoint_id=first_id, client=client)
    futures = [ex.submit(triple, i) for i in range(50)]
    task_ids = wait_until(lambda: all(f.task_id for f in futures) and [f.task_id for f in futures],
                          30, "tasks submitted")
    states = {client.get_task(t)["state"] for t in task_ids[:3]}
    assert states == {"waiting-for-endpoint"}
    assert not any(f.done() for f in futures)

    assert ep.start(client) == first_id
    assert [f.result(timeout=60) for f in futures] == [3 * i for i in range(50)]
    ex.shutdown()
    listed = ep.cli("list")
    assert first_id in listed.stdout and "offline" in listed.stdout, listed.stdout


def test_running_task_survives_broker_restart(
    endpoint: Endpoint, broker: Broker, client: Client, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"

    def wait_for_gate(path: str) -> str:
        import os
        import time

        deadline = time.time() + 90
        while not os.path.exists(path):
            if time.time() > deadline:
                raise TimeoutError(path)
            time.sleep(0.02)
        return "through the gate"

    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(wait_for_gate, str(gate))
        task_id = wait_until(lambda: future.task_id, 30, "task id")
        wait_until(lambda: client.get_task(task_id)["state"] == "running", 30, "running")
        broker.proc.stop()
        broker.start()
        gate.touch()
        assert future.result(timeout=90) == "through the gate"
    assert client.get_task(task_id)["state"] == "success"


def test_second_user_cannot_see_or_use_first_users_objects(
    endpoint: Endpoint, broker: Broker, client: Client
) -> None:
    def ident(x: int) -> int:
        return x

    function_id = client.register_function(ident)
    task_id = client.run(1, endpoint_id=endpoint.endpoint_id, function_id=function_id)
    wait_until(lambda: _result_or_none(client, task_id) == 1, 60, "result")

    bob = Client(broker_url=broker.url, token=broker.create_user(f"bob-{uuid.uuid4().hex[:6]}"))
    with pytest.raises(NotFound):
        bob.get_task(task_id)
    with pytest.raises(NotFound):
        bob.get_result(task_id)
    with pytest.raises(NotFound):
        bob.get_endpoint_status(endpoint.endpoint_id)
    with pytest.raises(NotFound):
        bob.get_function(function_id)
    with pytest.raises(NotFound):
        bob.delete_endpoint(endpoint.endpoint_id)
    bob_function = bob.register_function(ident)
    with pytest.raises(NotFound):
        bob.run(1, endpoint_id=endpoint.endpoint_id, function_id=bob_function)
    assert endpoint.endpoint_id not in {e["endpoint_id"] for e in bob.get_endpoints()}
    assert "result" not in (bob.get_batch_result([task_id]).get(task_id) or {})
    # alice's endpoint still works and is still hers
    assert client.get_endpoint_status(endpoint.endpoint_id)["status"] == "online"


def test_every_route_needs_a_token(broker: Broker) -> None:
    spec = httpx.get(f"{broker.url}/openapi.json").json()
    open_paths = {"/v1/health", "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"}
    checked = 0
    for path, methods in spec["paths"].items():
        if path in open_paths:
            continue
        concrete = path
        for part in path.split("/"):
            if part.startswith("{"):
                concrete = concrete.replace(part, "00000000-0000-0000-0000-000000000000")
        for method in methods:
            answer = httpx.request(method.upper(), broker.url + concrete, json={})
            assert answer.status_code == 401, (method, path, answer.status_code, answer.text)
            assert answer.json().get("message"), answer.text
            bad = httpx.request(method.upper(), broker.url + concrete, json={},
                                headers={"Authorization": "Bearer fcu_not-a-real-token"})
            assert bad.status_code == 401, (method, path, bad.status_code)
            checked += 1
    assert checked >= 10


def test_bad_input_gets_a_clear_4xx(broker: Broker, token: str, endpoint: Endpoint) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    big = b'{"function": "' + b"a" * (11 * 1024 * 1024) + b'"}'
    answer = httpx.post(f"{broker.url}/v1/functions", content=big,
                        headers={**auth, "Content-Type": "application/json"}, timeout=60)
    assert answer.status_code == 413
    assert "limit" in answer.json()["message"].lower() or "large" in answer.json()["message"].lower()

    answer = httpx.post(f"{broker.url}/v1/tasks", content=b'{"endpoint_id": ',
                        headers={**auth, "Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500
    assert answer.json()["message"]

    answer = httpx.post(f"{broker.url}/v1/tasks", json={"endpoint_id": endpoint.endpoint_id, "tasks": []},
                        headers=auth)
    assert answer.status_code == 422
    assert "tasks" in answer.text

    answer = httpx.post(
        f"{broker.url}/v1/tasks",
        json={"endpoint_id": endpoint.endpoint_id,
              "tasks": [{"function_id": "no-such-function", "args": "10\nAA=="}]},
        headers=auth,
    )
    assert answer.status_code == 404
    assert "no-such-function" in answer.json()["message"]

    answer = httpx.get(f"{broker.url}/v1/tasks/no-such-task", headers=auth)
    assert answer.status_code == 404 and answer.json()["error"] == "not_found"


def test_cli_users_create_prints_token_last(broker: Broker) -> None:
    out = subprocess.run([str(BIN / "farcall-broker"), "users", "create", "carol"], env=broker.env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    token = out.strip().splitlines()[-1]
    assert httpx.get(f"{broker.url}/v1/endpoints",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert os.environ.get("FARCALL_TOKEN") != token


def test_allowed_functions_refuse_other_functions(make_endpoint: Any, client: Client, tmp_path: Path) -> None:
    from farcall.errors import FunctionNotAllowed

    def permitted(x: int) -> int:
        return x + 1

    def forbidden(path: str) -> None:
        open(path, "w").close()

    allowed_id = client.register_function(permitted)
    ep = make_endpoint("guarded", config={"allowed_functions": [allowed_id]})
    eid = ep.start(client)
    marker = tmp_path / "ran"
    with Executor(endpoint_id=eid, client=client) as ex:
        assert ex.submit_to_registered_function(allowed_id, (1,)).result(timeout=60) == 2
        with pytest.raises(FunctionNotAllowed, match="allowed_functions"):
            ex.submit(forbidden, str(marker)).result(timeout=60)
    assert not marker.exists()


def test_delete_removes_the_endpoint_at_the_broker_and_here(make_endpoint: Any, client: Client) -> None:
    ep = make_endpoint("doomed")
    eid = ep.start(client)
    ep.stop()
    done = ep.cli("delete", "doomed", "--yes")
    assert done.returncode == 0, done.stderr
    assert f"deleted endpoint {eid}" in done.stdout and not ep.dir.exists()
    with pytest.raises(NotFound):
        client.get_endpoint_status(eid)
