"""The assembled app (``create_app``) on the in-process store and queue: its OpenAPI document,
isolation across resources, and the answers every route shares (body limits, bad bodies,
unknown routes, a backing service down)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.settings import Settings
from farcall.broker.store.memory import MemoryStore
from farcall.broker.store.redis import RedisStore
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api

LIMIT = 64 * 1024


@pytest.fixture
def app_api(make_api: MakeApi) -> Api:
    """An app with a small body limit (so a test need not send 10 MB)."""
    return make_api(Settings(max_payload_bytes=LIMIT, auth_failure_rate=0))


def submit(api: Api, headers: dict[str, str], endpoint_id: str, function_ids: list[str],
           **kw: Any) -> httpx.Response:
    tasks = [{"function_id": f, "args": f"ARGS{i}"} for i, f in enumerate(function_ids)]
    return api.client.post(
        "/v1/tasks", json={"endpoint_id": endpoint_id, "tasks": tasks, **kw}, headers=headers
    )


def test_health_and_openapi(api: Api) -> None:
    r = api.client.get("/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    paths = api.client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/functions",
        "/v1/endpoints/{endpoint_id}/status",
        "/v1/tasks",
        "/v1/tasks/status",
        "/v1/task_groups/{task_group_id}",
    ):
        assert path in paths


def test_openapi_shows_answers_and_error_bodies(api: Api) -> None:
    """Every route's success answer has a schema, and every user route documents its errors."""
    spec = api.client.get("/openapi.json").json()

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


def test_other_users_objects_answer_404_like_unknown_ones(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    fid = api.function(alice)
    ep = api.endpoint(alice)
    sub = submit(api, alice, ep["endpoint_id"], [fid]).json()
    tid, gid = sub["task_ids"][0], sub["task_group_id"]
    for path in (
        f"/v1/functions/{fid}",
        f"/v1/endpoints/{ep['endpoint_id']}",
        f"/v1/endpoints/{ep['endpoint_id']}/status",
        f"/v1/tasks/{tid}",
        f"/v1/task_groups/{gid}",
    ):
        theirs = api.client.get(path, headers=bob)
        unknown = api.client.get(
            path.replace(path.rsplit("/", 1)[-1], "0" * 8)
            if not path.endswith("/status")
            else path.replace(ep["endpoint_id"], "x"),
            headers=bob,
        )
        assert theirs.status_code == unknown.status_code == 404, path
        assert theirs.json()["error"] == "not_found"
        assert api.client.get(path, headers=alice).status_code == 200
    assert api.client.delete(f"/v1/functions/{fid}", headers=bob).status_code == 404
    assert api.client.delete(f"/v1/endpoints/{ep['endpoint_id']}", headers=bob).status_code == 404
    assert api.client.get("/v1/endpoints", headers=bob).json() == {"endpoints": []}
    status = api.client.post("/v1/tasks/status", json={"task_ids": [tid]}, headers=bob)
    assert status.json() == {"tasks": {}}

    bob_fid = api.function(bob)
    r = submit(api, bob, ep["endpoint_id"], [bob_fid])
    assert r.status_code == 404 and ep["endpoint_id"] in r.json()["message"]
    bob_ep = api.endpoint(bob)
    r = submit(api, bob, bob_ep["endpoint_id"], [bob_fid, fid])
    assert r.status_code == 404 and fid in r.json()["message"]
    r = submit(api, bob, bob_ep["endpoint_id"], [bob_fid], task_group_id=gid)
    assert r.status_code == 404 and gid in r.json()["message"]


def test_malformed_and_misshapen_bodies_get_422(api: Api) -> None:
    alice = api.user("alice")
    r = api.client.post(
        "/v1/functions",
        content=b"{not json",
        headers={**alice, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["detail"] and "message" in r.json()
    r = api.client.post("/v1/tasks", json={"endpoint_id": "x", "tasks": []}, headers=alice)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "tasks"
    r = api.client.post("/v1/tasks", json={"endpoint_id": 5, "tasks": "no"}, headers=alice)
    assert r.status_code == 422
    r = api.client.post("/v1/tasks/status", json={"task_ids": ["t"] * 10_001}, headers=alice)
    assert r.status_code == 422
    r = api.client.post("/v1/endpoints", json={"name": ""}, headers=alice)
    assert r.status_code == 422


def test_a_body_that_is_not_utf8_json_gets_400_saying_what_to_send(api: Api) -> None:
    r = api.client.post("/v1/functions", content=b'{"function": "\xff"}',
                        headers={**api.user("alice"), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert "could not be read as JSON" in r.json()["message"]


def test_oversize_bodies_get_413(app_api: Api) -> None:
    api, alice = app_api, app_api.user("alice")
    big = {"function": "x" * (LIMIT + 1)}
    r = api.client.post("/v1/functions", json=big, headers=alice)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    assert str(LIMIT) in r.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"function": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    r = api.client.post(
        "/v1/functions", content=chunks(), headers={**alice, "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    r = api.client.post("/v1/functions", json={"function": "x" * (LIMIT // 2)}, headers=alice)
    assert r.status_code == 200


def test_unknown_route_is_json_404(api: Api) -> None:
    r = api.client.get("/v1/nothing-here", headers=api.user("alice"))
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_store_down_answers_503(make_api: MakeApi) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="farcall-test-down:")
    api = make_api(Settings(), store=store, queue=MemoryQueue())
    r = api.client.get("/v1/endpoints", headers={"Authorization": "Bearer fcu_x"})
    assert r.status_code == 503 and r.json()["error"] == "unavailable"


def test_queue_down_answers_503(make_api: MakeApi) -> None:
    from farcall.broker.queue.rabbitmq import RabbitQueue

    api = make_api(Settings(), store=MemoryStore(),
                   queue=RabbitQueue("amqp://guest:guest@127.0.0.1:1/"))
    r = api.client.post("/v1/endpoints", json={"name": "e"}, headers=api.user("alice"))
    assert r.status_code == 503 and r.json()["error"] == "unavailable"
