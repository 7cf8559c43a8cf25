"""REST routes on the in-process store and queue: auth, isolation, errors, batch submission."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from farcall.broker import auth
from farcall.broker.app import create_app
from farcall.broker.errors import Unavailable
from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.settings import Settings
from farcall.broker.store.memory import MemoryStore
from farcall.broker.store.redis import RedisStore
from farcall.protocol.channel import parse_task_batch

LIMIT = 64 * 1024


@dataclass
class Env:
    client: TestClient
    store: MemoryStore
    queue: MemoryQueue
    alice: dict[str, str]
    bob: dict[str, str]

    def user(self, name: str) -> dict[str, str]:
        _, token = self.client.portal.call(auth.create_user, self.store.users, name)  # type: ignore[union-attr]
        return {"Authorization": f"Bearer {token}"}

    def function(self, headers: dict[str, str], payload: str = "FN") -> str:
        r = self.client.post(
            "/v1/functions", json={"function": payload, "function_name": "f"}, headers=headers
        )
        assert r.status_code == 200, r.text
        return r.json()["function_id"]

    def endpoint(self, headers: dict[str, str]) -> dict[str, str]:
        r = self.client.post("/v1/endpoints", json={"name": "ep"}, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def env() -> Iterator[Env]:
    store, queue = MemoryStore(), MemoryQueue()
    # No limit on failed authentication: these tests send bad tokens on purpose, many times
    # (the limit has tests of its own: tests/broker/test_limits.py, tests/integration/test_limits.py).
    app = create_app(Settings(max_payload_bytes=LIMIT, auth_failure_rate=0), store=store,
                     queue=queue)
    with TestClient(app) as client:
        e = Env(client, store, queue, {}, {})
        e.alice, e.bob = e.user("alice"), e.user("bob")
        yield e


def _submit(
    env: Env, headers: dict[str, str], endpoint_id: str, function_ids: list[str], **kw: Any
) -> httpx.Response:
    tasks = [{"function_id": f, "args": f"ARGS{i}"} for i, f in enumerate(function_ids)]
    return env.client.post(
        "/v1/tasks", json={"endpoint_id": endpoint_id, "tasks": tasks, **kw}, headers=headers
    )


def test_health_and_openapi(env: Env) -> None:
    r = env.client.get("/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    paths = env.client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/functions",
        "/v1/endpoints/{endpoint_id}/status",
        "/v1/tasks",
        "/v1/tasks/status",
        "/v1/task_groups/{task_group_id}",
    ):
        assert path in paths


def test_openapi_shows_answers_and_error_bodies(env: Env) -> None:
    """Every route's success answer has a schema, and every user route documents its errors."""
    spec = env.client.get("/openapi.json").json()

    def ref(op: dict[str, Any], status: str) -> str:
        return str(op["responses"][status]["content"]["application/json"]["schema"]["$ref"])

    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            success = min(s for s in op["responses"] if s.startswith("2"))  # 201: a new blob
            content = op["responses"][success]["content"]
            if "application/octet-stream" in content:  # a blob's bytes
                assert content["application/octet-stream"]["schema"]["format"] == "binary"
            else:
                assert ref(op, success).startswith("#/components/schemas/"), (method, path)
            if path == "/v1/health":
                continue
            for status in ("400", "401", "403", "413", "422", "429", "503"):
                assert ref(op, status) == "#/components/schemas/ErrorBody", (method, path, status)
            if "{" in path:
                assert ref(op, "404") == "#/components/schemas/ErrorBody", (method, path)
    ops = spec["paths"]
    assert ref(ops["/v1/tasks/{task_id}"]["get"], "200").endswith("/TaskInfo")
    assert ref(ops["/v1/tasks"]["post"], "413").endswith("/ErrorBody")
    task = spec["components"]["schemas"]["TaskInfo"]["properties"]
    assert {"state", "transitions", "data", "error", "warnings"} <= set(task)


def test_every_route_needs_a_token(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    checked = 0
    for path, methods in paths.items():
        if path == "/v1/health":
            continue
        url = path.replace("{", "").replace("}", "")
        for method in methods:
            r = env.client.request(method.upper(), url, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
            bad = env.client.request(
                method.upper(), url, headers={"Authorization": "Bearer fcu_nope"}
            )
            assert bad.status_code == 401
            checked += 1
    assert checked >= 13


def test_endpoint_credential_is_forbidden_on_user_routes(env: Env) -> None:
    ep = env.endpoint(env.alice)
    r = env.client.get("/v1/endpoints", headers={"Authorization": f"Bearer {ep['credential']}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_other_users_objects_answer_404_like_unknown_ones(env: Env) -> None:
    fid = env.function(env.alice)
    ep = env.endpoint(env.alice)
    sub = _submit(env, env.alice, ep["endpoint_id"], [fid]).json()
    tid, gid = sub["task_ids"][0], sub["task_group_id"]
    for path in (
        f"/v1/functions/{fid}",
        f"/v1/endpoints/{ep['endpoint_id']}",
        f"/v1/endpoints/{ep['endpoint_id']}/status",
        f"/v1/tasks/{tid}",
        f"/v1/task_groups/{gid}",
    ):
        theirs = env.client.get(path, headers=env.bob)
        unknown = env.client.get(
            path.replace(path.rsplit("/", 1)[-1], "0" * 8)
            if not path.endswith("/status")
            else path.replace(ep["endpoint_id"], "x"),
            headers=env.bob,
        )
        assert theirs.status_code == unknown.status_code == 404, path
        assert theirs.json()["error"] == "not_found"
        assert env.client.get(path, headers=env.alice).status_code == 200
    assert env.client.delete(f"/v1/functions/{fid}", headers=env.bob).status_code == 404
    assert (
        env.client.delete(f"/v1/endpoints/{ep['endpoint_id']}", headers=env.bob).status_code == 404
    )
    assert env.client.get("/v1/endpoints", headers=env.bob).json() == {"endpoints": []}
    status = env.client.post("/v1/tasks/status", json={"task_ids": [tid]}, headers=env.bob)
    assert status.json() == {"tasks": {}}

    bob_fid = env.function(env.bob)
    r = _submit(env, env.bob, ep["endpoint_id"], [bob_fid])
    assert r.status_code == 404 and ep["endpoint_id"] in r.json()["message"]
    bob_ep = env.endpoint(env.bob)
    r = _submit(env, env.bob, bob_ep["endpoint_id"], [bob_fid, fid])
    assert r.status_code == 404 and fid in r.json()["message"]
    r = _submit(env, env.bob, bob_ep["endpoint_id"], [bob_fid], task_group_id=gid)
    assert r.status_code == 404 and gid in r.json()["message"]


def test_batch_submit_records_and_queues_every_task(env: Env) -> None:
    f1, f2 = env.function(env.alice, "PAYLOAD1"), env.function(env.alice, "PAYLOAD2")
    ep = env.endpoint(env.alice)
    eid = ep["endpoint_id"]
    submitter = {"python": "3.11.7", "dill": "0.4.1", "farcall": "0.1.0"}
    r = _submit(env, env.alice, eid, [f1, f2, f1, f1, f2], submitter=submitter)
    assert r.status_code == 200, r.text
    body = r.json()
    ids, gid = body["task_ids"], body["task_group_id"]
    assert len(set(ids)) == 5
    assert env.client.get(f"/v1/task_groups/{gid}", headers=env.alice).json()["task_ids"] == ids

    task = env.client.get(f"/v1/tasks/{ids[0]}", headers=env.alice).json()
    assert task["state"] == "waiting-for-endpoint" and task["endpoint_id"] == eid
    assert list(task["transitions"]) == ["received", "waiting-for-endpoint"]
    assert task["submitter"] == submitter and "data" not in task

    status = env.client.post(
        "/v1/tasks/status", json={"task_ids": [*ids, "unknown"]}, headers=env.alice
    )
    assert set(status.json()["tasks"]) == set(ids)

    st = env.client.get(f"/v1/endpoints/{eid}/status", headers=env.alice).json()
    assert st["queued_tasks"] == 5 and st["status"] == "offline"
    (message,) = env.queue._get(eid).items  # the batch is queued whole, as one message
    queued = parse_task_batch(message)
    assert [m.task_id for m in queued] == ids
    # tasks name their function; its body goes to the endpoint once per session, not per task
    assert [m.function_id for m in queued] == [f1, f2, f1, f1, f2]
    assert {m.function for m in queued} == {""}
    assert queued[3].args == "ARGS3" and queued[0].submitter.dill == "0.4.1"  # type: ignore[union-attr]

    more = _submit(env, env.alice, eid, [f2], task_group_id=gid).json()
    assert more["task_group_id"] == gid
    assert (
        env.client.get(f"/v1/task_groups/{gid}", headers=env.alice).json()["task_ids"]
        == ids + more["task_ids"]
    )
    new_group = env.client.post("/v1/task_groups", json={}, headers=env.alice).json()[
        "task_group_id"
    ]
    into = _submit(env, env.alice, eid, [f1], task_group_id=new_group).json()
    assert into["task_group_id"] == new_group


def test_function_and_endpoint_lifecycle(env: Env) -> None:
    fid = env.function(env.alice, "CODE")
    got = env.client.get(f"/v1/functions/{fid}", headers=env.alice).json()
    assert got["function"] == "CODE" and got["function_name"] == "f" and "user_id" not in got
    assert env.client.delete(f"/v1/functions/{fid}", headers=env.alice).json() == {
        "function_id": fid,
        "deleted": True,
    }
    assert env.client.get(f"/v1/functions/{fid}", headers=env.alice).status_code == 404

    ep = env.endpoint(env.alice)
    assert ep["credential"].startswith("fce_") and ep["name"] == "ep"
    listed = env.client.get("/v1/endpoints", headers=env.alice).json()["endpoints"]
    assert [(e["endpoint_id"], e["status"]) for e in listed] == [(ep["endpoint_id"], "offline")]
    r = env.client.delete(f"/v1/endpoints/{ep['endpoint_id']}", headers=env.alice)
    assert r.json() == {"endpoint_id": ep["endpoint_id"], "deleted": True}
    assert (
        env.client.get(f"/v1/endpoints/{ep['endpoint_id']}", headers=env.alice).status_code == 404
    )
    assert env.client.portal.call(auth.authenticate, env.store.users, ep["credential"]) is None  # type: ignore[union-attr]


def test_malformed_and_misshapen_bodies_get_422(env: Env) -> None:
    r = env.client.post(
        "/v1/functions",
        content=b"{not json",
        headers={**env.alice, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["detail"] and "message" in r.json()
    r = env.client.post("/v1/tasks", json={"endpoint_id": "x", "tasks": []}, headers=env.alice)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "tasks"
    r = env.client.post("/v1/tasks", json={"endpoint_id": 5, "tasks": "no"}, headers=env.alice)
    assert r.status_code == 422
    r = env.client.post("/v1/tasks/status", json={"task_ids": ["t"] * 10_001}, headers=env.alice)
    assert r.status_code == 422
    r = env.client.post("/v1/endpoints", json={"name": ""}, headers=env.alice)
    assert r.status_code == 422


def test_a_body_that_is_not_utf8_json_gets_400_saying_what_to_send(env: Env) -> None:
    r = env.client.post("/v1/functions", content=b'{"function": "\xff"}',
                        headers={**env.alice, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert "could not be read as JSON" in r.json()["message"]


def test_oversize_bodies_get_413(env: Env) -> None:
    big = {"function": "x" * (LIMIT + 1)}
    r = env.client.post("/v1/functions", json=big, headers=env.alice)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    assert str(LIMIT) in r.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"function": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    r = env.client.post(
        "/v1/functions", content=chunks(), headers={**env.alice, "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    r = env.client.post("/v1/functions", json={"function": "x" * (LIMIT // 2)}, headers=env.alice)
    assert r.status_code == 200


def test_unknown_route_is_json_404(env: Env) -> None:
    r = env.client.get("/v1/nothing-here", headers=env.alice)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_store_down_answers_503() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="farcall-test-down:")
    app = create_app(Settings(), store=store, queue=MemoryQueue())
    with TestClient(app) as client:
        r = client.get("/v1/endpoints", headers={"Authorization": "Bearer fcu_x"})
    assert r.status_code == 503 and r.json()["error"] == "unavailable"


def test_queue_down_answers_503() -> None:
    from farcall.broker.queue.rabbitmq import RabbitQueue

    store = MemoryStore()
    app = create_app(Settings(), store=store, queue=RabbitQueue("amqp://guest:guest@127.0.0.1:1/"))
    with TestClient(app) as client:
        _, token = client.portal.call(auth.create_user, store.users, "alice")  # type: ignore[union-attr]
        r = client.post(
            "/v1/endpoints", json={"name": "e"}, headers={"Authorization": f"Bearer {token}"}
        )
    assert r.status_code == 503 and r.json()["error"] == "unavailable"


def test_tasks_that_could_not_be_queued_are_failed() -> None:
    class BrokenQueue(MemoryQueue):
        async def publish(self, endpoint_id: str, bodies: list[bytes]) -> None:
            raise Unavailable("RabbitMQ is not answering")

    store = MemoryStore()
    app = create_app(Settings(), store=store, queue=BrokenQueue())
    with TestClient(app) as client:
        e = Env(client, store, app.state.services.queue, {}, {})
        alice = e.user("alice")
        eid = e.endpoint(alice)["endpoint_id"]
        group = client.post("/v1/task_groups", headers=alice).json()["task_group_id"]
        r = _submit(e, alice, eid, [e.function(alice)], task_group_id=group)
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        (task_id,) = client.get(f"/v1/task_groups/{group}", headers=alice).json()["task_ids"]
        failed = client.get(f"/v1/tasks/{task_id}", headers=alice).json()
        assert failed["state"] == "failed" and "submit it again" in failed["error"]


@pytest.mark.parametrize(
    ("worker", "warned"),
    [({"python": "3.12.1", "dill": "0.3.9"}, True), ({"python": "3.11.9", "dill": "0.4.1"}, False)],
)
def test_task_record_warns_when_worker_versions_differ(
    env: Env, worker: dict[str, str], warned: bool
) -> None:
    from farcall.protocol.channel import ResultMessage
    from farcall.protocol.common import TaskState, Versions, now

    eid = env.endpoint(env.alice)["endpoint_id"]
    submitter = {"python": "3.11.7", "dill": "0.4.1"}
    (task_id,) = _submit(env, env.alice, eid, [env.function(env.alice)], submitter=submitter).json()[
        "task_ids"
    ]
    result = ResultMessage(task_id=task_id, state=TaskState.SUCCESS, data="10\nAA==",
                           worker=Versions(**worker))
    env.client.portal.call(env.store.tasks.complete, eid, [result], now())  # type: ignore[union-attr]
    task = env.client.get(f"/v1/tasks/{task_id}", headers=env.alice).json()
    assert task["worker"]["python"] == worker["python"]
    if warned:
        (warning,) = task["warnings"]
        assert "Python 3.11.7, dill 0.4.1" in warning and "Python 3.12.1, dill 0.3.9" in warning
    else:
        assert "warnings" not in task
