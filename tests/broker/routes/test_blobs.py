"""The data plane's routes on an embedded broker over real HTTP: limits, upload, download, the
endpoint's grant, size and length errors, and blob lifetime renewed with results."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from farcall import serialize
from farcall.blobs import task_grant
from farcall.broker import grants
from farcall.broker.embedded import EmbeddedBroker
from farcall.broker.settings import Settings
from farcall.broker.store.memory.blobs import MemoryBlobs
from farcall.protocol.channel import ResultMessage, ResultsAck, ResultsFrame
from farcall.protocol.common import TaskState, now
from harness.procs import wait_until
from tests.broker.helpers import FakeEndpoint, on_loop

MiB = 1024 * 1024
PAYLOAD_LIMIT = 64 * 1024
TASK_LIMIT = 16 * MiB
RESULT_TTL = 3600


@dataclass
class Env:
    broker: EmbeddedBroker
    http: httpx.Client
    """Alice's client."""
    token: str

    @property
    def blobs(self) -> MemoryBlobs:
        found = self.broker.app.state.services.blobs
        assert isinstance(found, MemoryBlobs)
        return found

    def upload(self, data: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post("/v1/blobs", content=data, headers=headers)

    def endpoint(self) -> tuple[str, str]:
        ep = self.http.post("/v1/endpoints", json={"name": "ep"}).json()
        return ep["endpoint_id"], ep["credential"]


@pytest.fixture
def env() -> Iterator[Env]:
    settings = Settings(max_payload_bytes=PAYLOAD_LIMIT, max_task_bytes=TASK_LIMIT,
                        result_ttl=RESULT_TTL, auth_failure_rate=0)
    with EmbeddedBroker(settings) as broker:
        token = broker.create_user("alice")
        with httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {token}"},
                          timeout=30) as http:
            yield Env(broker, http, token)


def _raw(url: str, head: str, body: bytes = b"", *, cut: bool = False) -> tuple[int, Any]:
    """Send a hand-made request (headers no client library would send); the status and JSON
    body of the answer. With ``cut``, stop sending after ``body`` and close the writing side."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        if cut:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            more = s.recv(65536)
            if not more:
                break
            answer += more
    if not answer:
        return 0, None
    status_line, _, rest = answer.partition(b"\r\n")
    body_text = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body_text) if body_text else None


def test_limits_say_what_the_broker_takes(env: Env) -> None:
    r = env.http.get("/v1/limits")
    assert r.status_code == 200, r.text
    assert r.json() == {"max_task_bytes": TASK_LIMIT, "max_payload_bytes": PAYLOAD_LIMIT,
                        "inline_bytes": serialize.INLINE_BYTES}
    assert httpx.get(f"{env.broker.url}/v1/limits").status_code == 401


def test_a_blob_over_the_body_limit_goes_up_and_comes_back_byte_for_byte(env: Env) -> None:
    data = os.urandom(10 * MiB + 3)  # far over max_payload_bytes: the body limit skips blobs
    r = env.upload(data)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["size"] == len(data) and len(created["blob_id"]) == 32
    got = env.http.get(f"/v1/blobs/{created['blob_id']}")
    assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
    assert int(got.headers["content-length"]) == len(data) and got.content == data
    assert env.upload(b"").json()["size"] == 0
    too_big_json = env.http.post("/v1/functions", json={"function": "x" * PAYLOAD_LIMIT})
    assert too_big_json.status_code == 413, "the body limit still holds elsewhere"


def test_upload_errors_say_what_to_fix(env: Env) -> None:
    def chunked() -> Iterator[bytes]:
        yield b"no length"

    r = env.http.post("/v1/blobs", content=chunked())
    assert r.status_code == 411 and r.json()["error"] == "length_required", r.text
    assert "Content-Length" in r.json()["message"]

    size = TASK_LIMIT + 1
    status, body = _raw(env.broker.url, "\r\n".join([
        "POST /v1/blobs HTTP/1.1", "Host: broker", f"Authorization: Bearer {env.token}",
        f"Content-Length: {size}", "Connection: close"]))
    assert status == 413 and body["error"] == "payload_too_large", body
    assert str(size) in body["message"] and str(TASK_LIMIT) in body["message"]
    assert "FARCALL_MAX_TASK_BYTES" in body["message"]

    for path in ("/v1/blobs/" + "A" * 32, "/v1/blobs/not..an..id"):
        r = env.http.get(path)
        assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
        assert "expired" in r.json()["message"]


def test_a_body_cut_short_stores_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes: list[object] = []
    write = env.blobs.write

    async def watched(*args: Any, **kwargs: Any) -> int:
        try:
            size = await write(*args, **kwargs)
        except BaseException as e:
            outcomes.append(e)
            raise
        outcomes.append(size)
        return size

    monkeypatch.setattr(env.blobs, "write", watched)
    status, body = _raw(env.broker.url, "\r\n".join([
        "POST /v1/blobs HTTP/1.1", "Host: broker", f"Authorization: Bearer {env.token}",
        "Content-Length: 5000000"]), os.urandom(300_000), cut=True)
    assert status in (0, 400), body  # the client half-closed: the broker may not answer
    wait_until(lambda: outcomes, 10, "the upload to end")
    assert isinstance(outcomes[0], Exception), f"a cut body was stored: {outcomes}"
    assert len(env.blobs) == 0
    assert on_loop(env.broker, env.blobs.usage(env.http.get("/v1/whoami").json()["identity_id"])) == 0
    assert env.upload(b"whole").status_code == 201 and len(env.blobs) == 1


def test_blobs_need_a_user_token_or_a_grant(env: Env) -> None:
    blob_id = env.upload(b"secret data").json()["blob_id"]
    for headers in ({}, {"Authorization": "Bearer fcu_nope"}):
        with httpx.Client(base_url=env.broker.url, headers=headers) as anon:
            for r in (anon.post("/v1/blobs", content=b"x"), anon.get(f"/v1/blobs/{blob_id}")):
                assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
    endpoint_id, credential = env.endpoint()
    with httpx.Client(base_url=env.broker.url,
                      headers={"Authorization": f"Bearer {credential}"}) as as_endpoint:
        r = as_endpoint.get(f"/v1/blobs/{blob_id}")
        assert r.status_code == 403, "an endpoint credential is not for blobs: its grant is"


def _grant(endpoint_id: str, welcome_key: str, task_id: str) -> dict[str, str]:
    return {grants.HEADER: task_grant(endpoint_id, base64.urlsafe_b64decode(welcome_key), task_id)}


def test_a_tasks_grant_moves_only_its_tasks_blobs_while_it_runs(env: Env) -> None:
    endpoint_id, credential = env.endpoint()
    function_id = env.http.post("/v1/functions", json={"function": "FN"}).json()["function_id"]
    argument = env.upload(b"an argument").json()
    others = env.upload(b"another blob of alice").json()["blob_id"]
    ref = serialize.ref_payload(argument["blob_id"], argument["size"])
    submitted = env.http.post("/v1/tasks", json={"endpoint_id": endpoint_id, "tasks": [
        {"function_id": function_id, "args": ref}]}).json()
    (task_id,) = submitted["task_ids"]
    ep = FakeEndpoint(env.broker.url, endpoint_id, credential)
    try:
        welcome = ep.hello(credit=1)
        ep.tasks(1)
        assert welcome.upload_grant and welcome.max_task_bytes == TASK_LIMIT
        grant = _grant(endpoint_id, welcome.upload_grant, task_id)
        with httpx.Client(base_url=env.broker.url, headers=grant) as worker:
            result = os.urandom(2 * MiB)
            r = worker.post("/v1/blobs", content=result)
            assert r.status_code == 201, r.text
            result_id = r.json()["blob_id"]
            assert worker.get(f"/v1/blobs/{argument['blob_id']}").content == b"an argument"
            for not_its_own in (others, result_id):
                assert worker.get(f"/v1/blobs/{not_its_own}").status_code == 404
            assert worker.get("/v1/limits").status_code == 401, "a grant is for blobs only"
        assert env.http.get(f"/v1/blobs/{result_id}").content == result, "the submitter's"
        alice = env.http.get("/v1/whoami").json()["identity_id"]
        assert on_loop(env.broker, env.blobs.usage(alice)) >= 2 * MiB

        other_id, _ = env.endpoint()
        key = base64.urlsafe_b64decode(welcome.upload_grant)
        forged = [
            task_grant(other_id, key, task_id),  # another endpoint's id with this key
            grant[grants.HEADER][:-4] + "AAA=",
            task_grant(endpoint_id, b"x" * 32, task_id),  # another key
            f"{endpoint_id}:{welcome.upload_grant}",  # the key itself, as the old grants were
            welcome.upload_grant,
            f"{endpoint_id}::",
        ]
        for value in forged:
            r = httpx.post(f"{env.broker.url}/v1/blobs", content=b"x",
                           headers={grants.HEADER: value})
            assert r.status_code == 401 and grants.HEADER in r.json()["message"], (value, r.text)

        ep.send(ResultsFrame(results=[ResultMessage(task_id=task_id, state=TaskState.SUCCESS,
                                                    data="R", started_at=now())]))
        assert isinstance(ep.recv(), ResultsAck)
    finally:
        ep.close()
    r = httpx.post(f"{env.broker.url}/v1/blobs", content=b"x", headers=grant)
    assert r.status_code == 403 and "any more" in r.json()["message"], "the grant ends with its task"
    wait_until(lambda: env.http.get(f"/v1/blobs/{argument['blob_id']}").status_code == 404, 10,
               "the argument blob freed when its task ended")

    env.http.delete(f"/v1/endpoints/{endpoint_id}").raise_for_status()
    r = httpx.post(f"{env.broker.url}/v1/blobs", content=b"x", headers=grant)
    assert r.status_code == 401 and "deleted" in r.json()["message"], r.text


def test_rotating_the_endpoints_credential_ends_its_grants(env: Env) -> None:
    """A grant a task read keeps working no longer than the credential its key came from."""
    endpoint_id, credential = env.endpoint()
    function_id = env.http.post("/v1/functions", json={"function": "FN"}).json()["function_id"]
    (task_id,) = env.http.post("/v1/tasks", json={"endpoint_id": endpoint_id, "tasks": [
        {"function_id": function_id, "args": "A"}]}).json()["task_ids"]
    ep = FakeEndpoint(env.broker.url, endpoint_id, credential)
    try:
        grant = _grant(endpoint_id, ep.hello(credit=1).upload_grant, task_id)
        ep.tasks(1)
        assert httpx.post(f"{env.broker.url}/v1/blobs", content=b"x", headers=grant).status_code == 201
        r = env.http.post(f"/v1/endpoints/{endpoint_id}/credential")
        assert r.status_code == 200, r.text
        refused = httpx.post(f"{env.broker.url}/v1/blobs", content=b"x", headers=grant)
        assert refused.status_code == 401, refused.text
    finally:
        ep.close()


def test_a_user_downloads_only_their_own_blobs(env: Env) -> None:
    blob_id = env.upload(b"alice's").json()["blob_id"]
    bob = env.broker.create_user("bob")
    r = httpx.get(f"{env.broker.url}/v1/blobs/{blob_id}", headers={"Authorization": f"Bearer {bob}"})
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
    assert env.http.get(f"/v1/blobs/{blob_id}").content == b"alice's"


def test_a_blob_over_the_owners_quota_is_refused_and_a_freed_one_makes_room(env: Env) -> None:
    env.broker.app.state.services.settings.max_blob_bytes_per_user = 3 * MiB
    first = env.upload(b"a" * (2 * MiB)).json()["blob_id"]
    r = env.upload(b"b" * (2 * MiB))
    assert r.status_code == 403 and r.json()["error"] == "quota_exceeded", r.text
    assert "FARCALL_MAX_BLOB_BYTES_PER_USER" in r.json()["message"]
    bob = env.broker.create_user("bob")
    r = httpx.post(f"{env.broker.url}/v1/blobs", content=b"c" * (2 * MiB),
                   headers={"Authorization": f"Bearer {bob}"})
    assert r.status_code == 201, "another user's quota is their own"
    on_loop(env.broker, env.blobs.delete([first]))
    assert env.upload(b"b" * (2 * MiB)).status_code == 201


def test_a_result_that_is_a_blob_reference_renews_the_blobs_lifetime(env: Env) -> None:
    endpoint_id, credential = env.endpoint()
    function_id = env.http.post("/v1/functions", json={"function": "FN"}).json()["function_id"]
    submitted = env.http.post("/v1/tasks", json={"endpoint_id": endpoint_id, "tasks": [
        {"function_id": function_id, "args": "A"}]}).json()
    (task_id,) = submitted["task_ids"]
    ep = FakeEndpoint(env.broker.url, endpoint_id, credential)
    try:
        welcome = ep.hello(credit=1)
        ep.tasks(1)
        grant = _grant(endpoint_id, welcome.upload_grant, task_id)
        blob = httpx.post(f"{env.broker.url}/v1/blobs", content=b"r" * 1000,
                          headers=grant).json()
        on_loop(env.broker, env.blobs.touch([blob["blob_id"]], 5))  # about to expire
        ref = serialize.ref_payload(blob["blob_id"], blob["size"])
        ep.send(ResultsFrame(results=[ResultMessage(task_id=task_id, state=TaskState.SUCCESS,
                                                    data=ref, started_at=now())]))
        assert isinstance(ep.recv(), ResultsAck)
    finally:
        ep.close()
    left = env.blobs._blobs[blob["blob_id"]].expires - time.monotonic()
    assert RESULT_TTL - 60 < left <= RESULT_TTL, "the blob must live as long as the result"
    wait_until(lambda: env.http.get(f"/v1/tasks/{task_id}").json()["data"] == ref, 10, "result")


def test_revoking_a_token_ends_its_upload_in_progress(env: Env) -> None:
    token = env.http.post("/v1/tokens", json={"name": "uploader"}).json()
    answers: list[tuple[int, Any]] = []
    sender = threading.Thread(target=lambda: answers.append(_raw(env.broker.url, "\r\n".join([
        "POST /v1/blobs HTTP/1.1", "Host: broker", f"Authorization: Bearer {token['token']}",
        "Content-Length: 5000000"]), os.urandom(300_000))))
    sender.start()
    wait_until(lambda: env.broker.app.state.services.uploads.held(
        env.http.get("/v1/whoami").json()["identity_id"]), 10, "the upload to start")
    started = time.monotonic()
    env.http.delete(f"/v1/tokens/{token['token_id']}").raise_for_status()
    sender.join(20)
    assert answers and answers[0][0] == 401, answers
    assert "revoked" in answers[0][1]["message"]
    assert time.monotonic() - started < 5, "ended by the revocation, not by the body timeout"
    assert len(env.blobs) == 0
