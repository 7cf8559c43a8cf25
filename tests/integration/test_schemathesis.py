"""schemathesis over the broker's OpenAPI document: a real broker process on real Redis and
RabbitMQ answers every generated request (valid and invalid bodies, ids and tokens) without a
5xx, with a status, content type, body and headers its document declares for that operation.

Generated ids would only ever meet 404s, so some cases swap in the ids of real objects (the
fuzzing user's own, and a peer's shared with it): the success answers are judged too. Bounded
in examples per operation so the file runs in a couple of minutes on two cores; select it
alone with ``-m fuzz``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from farcall.broker.app import create_app
from farcall.broker.settings import Settings
from tests.integration.helpers import Broker, own_broker

pytestmark = [pytest.mark.integration, pytest.mark.fuzz]

EXAMPLES = int(os.environ.get("FARCALL_FUZZ_EXAMPLES", "150"))
"""Generated cases per operation in the fuzzing phase (the coverage phase adds its own few);
raise it for a deeper run by hand (150: about a minute here)."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
OPAQUE = "opaque payload: the broker never reads it"


@pytest.fixture(scope="module")
def fuzz_broker(service_env: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of its own with no rate limits (the fuzzing would be answered 429 otherwise)
    and small quotas (so the quota answers are judged too)."""
    with own_broker(service_env, tmp_path_factory.mktemp("fuzz"), "fuzz", settings={
        "FARCALL_RATE_LIMIT": "0", "FARCALL_AUTH_FAILURE_RATE": "0",
        "FARCALL_MAX_ENDPOINTS": "20", "FARCALL_MAX_FUNCTIONS": "200",
        "FARCALL_MAX_OPEN_TASKS": "100", "FARCALL_MAX_TIMERS": "20",
    }) as broker:
        yield broker


@dataclass
class Pool:
    """Real objects whose ids the cases may carry instead of generated ones."""

    url: str
    """The broker's."""
    http: httpx.Client
    """The fuzzing user's client."""
    token: str
    peer: str
    """A second user's name (for share bodies)."""
    credential: str
    """An endpoint credential (refused on every user route)."""
    endpoints: list[str]
    functions: list[str]
    foreign: dict[str, str]
    """Path parameter -> the id of a peer's object shared with the fuzzing user (who may not
    delete it), or for a timer (never shared) one the fuzzing user may not even see."""
    task_group: str
    task: str
    timers: list[str] = field(default_factory=list)
    """The fuzzing user's timers (a nightly one: it stays put)."""

    def post(self, path: str, body: Any = None) -> Any:
        answer = self.http.post(path, json=body)
        assert answer.status_code == 200, f"POST {path}: {answer.status_code} {answer.text}"
        return answer.json()

    def fresh(self, name: str) -> str | None:
        """A new object of the fuzzing user's for a path parameter ``name`` (for deletions);
        None when its quota is reached."""
        path, body, key = {
            "endpoint_id": ("/v1/endpoints", {"name": "fresh"}, "endpoint_id"),
            "function_id": ("/v1/functions", {"function": OPAQUE}, "function_id"),
            "token_id": ("/v1/tokens", {"name": "fresh"}, "token_id"),
            "timer_id": ("/v1/timers", self.timer_body(), "timer_id"),
        }[name]
        answer = self.http.post(path, json=body)
        if answer.status_code == 403 and answer.json()["error"] == "quota_exceeded":
            return None
        assert answer.status_code == 200, f"POST {path}: {answer.status_code} {answer.text}"
        return str(answer.json()[key])

    def timer_body(self) -> dict[str, Any]:
        """A timer of this user's first endpoint and function (a nightly one: it stays put)."""
        return {"endpoint_id": self.endpoints[0] if self.endpoints else "",
                "function_id": self.functions[0] if self.functions else "", "args": OPAQUE,
                "cron": "0 2 * * *"}

    def real(self, name: str, pick: int) -> str | None:
        """The ``pick``-th real id for a parameter or field called ``name``, if there is one."""
        found: list[str] = {
            "endpoint_id": self.endpoints, "function_id": self.functions,
            "task_group_id": [self.task_group], "task_id": [self.task], "timer_id": self.timers,
        }.get(name, [])
        return found[pick % len(found)] if found else None


@pytest.fixture(scope="module")
def pool(fuzz_broker: Broker) -> Iterator[Pool]:
    tag = uuid.uuid4().hex[:6]
    token = fuzz_broker.create_user(f"fuzzer-{tag}")
    peer_name = f"peer-{tag}"
    peer_token = fuzz_broker.create_user(peer_name)
    with httpx.Client(base_url=fuzz_broker.url, timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as http, \
         httpx.Client(base_url=fuzz_broker.url, timeout=30,
                      headers={"Authorization": f"Bearer {peer_token}"}) as peer_http:
        peer = Pool(fuzz_broker.url, peer_http, peer_token, "", "", [], [], {}, "", "")
        shared_endpoint = peer.post("/v1/endpoints", {"name": "peer's"})["endpoint_id"]
        shared_function, public_function = (
            peer.post("/v1/functions", {"function": OPAQUE})["function_id"] for _ in range(2))
        me = {"username": f"fuzzer-{tag}"}
        peer.post(f"/v1/endpoints/{shared_endpoint}/share", me)
        peer.post(f"/v1/functions/{shared_function}/share", me)
        peer.post(f"/v1/functions/{public_function}/share", {"public": True})

        made = Pool(fuzz_broker.url, http, token, peer_name, "", [], [], {}, "", "")
        endpoint = made.post("/v1/endpoints", {"name": "mine"})
        made.credential = endpoint["credential"]
        made.endpoints = [endpoint["endpoint_id"], shared_endpoint]
        made.functions = [made.post("/v1/functions", {"function": OPAQUE})["function_id"],
                          shared_function, public_function]
        peer.endpoints, peer.functions = [shared_endpoint], [shared_function]
        made.foreign = {"endpoint_id": shared_endpoint, "function_id": shared_function,
                        "timer_id": peer.post("/v1/timers", peer.timer_body())["timer_id"]}
        made.timers = [made.post("/v1/timers", made.timer_body())["timer_id"]]
        submitted = made.post("/v1/tasks", {"endpoint_id": made.endpoints[0], "tasks": [
            {"function_id": made.functions[0], "args": OPAQUE}]})
        made.task_group, made.task = submitted["task_group_id"], submitted["task_ids"][0]
        yield made


DOCUMENT = json.loads(json.dumps(create_app(Settings()).openapi()))
"""The broker's OpenAPI document, built at collection (schemathesis's fixture-based loader,
``schemathesis.pytest.from_fixture``, fails on pytest 9); ``test_the_broker_serves_the_document``
shows the process serves this very document."""

schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({
    "generation": {"mode": "all", "max-examples": EXAMPLES, "with-security-parameters": False,
                   "database": "none"},
    "phases": {"stateful": {"enabled": False}},
}))


def test_the_broker_serves_the_document(fuzz_broker: Broker) -> None:
    served = httpx.get(f"{fuzz_broker.url}/openapi.json", timeout=30)
    assert served.status_code == 200 and served.json() == DOCUMENT

CREDENTIALS = ["user"] * 7 + ["none", "unknown", "endpoint"]
"""Which credential a case carries: mostly the user's token."""


def _swap_ids(case: schemathesis.Case, pool: Pool, pick: int) -> None:
    """Carry real ids (and a real user's name) where the case has generated ones."""
    for name in list(case.path_parameters or {}):
        if case.method == "DELETE":  # never the pool's own objects: later cases use them
            fresh = pool.fresh(name) if pick % 2 == 0 or name not in pool.foreign else None
            case.path_parameters[name] = fresh or pool.foreign[name]
        elif (real := pool.real(name, pick)) is not None:
            case.path_parameters[name] = real
    body: Any = case.body
    if not isinstance(body, dict):
        return
    for name, value in list(body.items()):
        if isinstance(value, str) and (real := pool.real(name, pick)) is not None:
            body[name] = real
    task_ids = body.get("task_ids")
    if isinstance(task_ids, list) and task_ids:
        task_ids[0] = pool.task
    if isinstance(body.get("username"), str):
        body["username"] = pool.peer
    tasks = body.get("tasks")
    for task in tasks if isinstance(tasks, list) else []:
        if isinstance(task, dict) and isinstance(task.get("function_id"), str):
            task["function_id"] = pool.real("function_id", pick)


@schema.parametrize()
@schema.given(credential=st.sampled_from(CREDENTIALS), pick=st.integers(0, 4))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # each case is a real request
def test_every_answer_is_one_the_document_declares(
    case: schemathesis.Case, credential: str, pick: int, pool: Pool
) -> None:
    if pick:
        _swap_ids(case, pool, pick)
    token = {"user": pool.token, "unknown": "fcu_" + "x" * 43, "endpoint": pool.credential,
             "none": None}[credential]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    case.call_and_validate(base_url=pool.url, headers=headers, checks=CHECKS, timeout=30)
