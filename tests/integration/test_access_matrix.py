"""Who may do what, route by route: every route in the broker's OpenAPI document, asked by the
owner of the objects, by a user they are shared with, by a stranger, by an endpoint credential
and by nobody (no token), answers exactly the status the access rules allow.

A real broker process on real Redis and RabbitMQ, raw HTTP (the SDK would hide the statuses).
Requests that change something act on objects made for that one request, so each answer in the
matrix is independent of the others; deletions run last all the same.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest

from tests.integration.helpers import Broker, own_broker

pytestmark = pytest.mark.integration

Caller = Literal["owner", "shared", "stranger", "credential", "anonymous"]
CALLERS: tuple[Caller, ...] = ("owner", "shared", "stranger", "credential", "anonymous")
USERS: tuple[Caller, ...] = ("owner", "shared", "stranger")
ERROR_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found"}
OPAQUE = "opaque payload: the broker never reads it"


@pytest.fixture(scope="module")
def matrix_broker(service_env: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of its own: the no-token requests here must not spend the failed-authentication
    budget of the loopback address that the session's broker gives every other test."""
    with own_broker(service_env, tmp_path_factory.mktemp("matrix"), "matrix",
                    settings={"FARCALL_AUTH_FAILURE_RATE": "0"}) as broker:
        yield broker


def _ok(response: httpx.Response) -> Any:
    """The JSON body of a 200 answer (setup steps), or a failure that shows the answer."""
    assert response.status_code == 200, (
        f"{response.request.method} {response.request.url.path}: {response.status_code} "
        f"{response.text[:500]}")
    return response.json()


@dataclass
class World:
    """Three users and the owner's objects; ``shared`` may use ``endpoint`` and ``function``."""

    names: dict[Caller, str]
    clients: dict[Caller, httpx.Client]
    endpoint: str = ""
    credential: str = ""
    function: str = ""
    private_endpoint: str = ""
    private_function: str = ""
    group: str = ""
    task: str = ""
    own: dict[Caller, tuple[str, str]] = field(default_factory=dict)
    """Each user's own (endpoint, function), for what they submit to themselves."""
    timer: str = ""

    def call(self, caller: Caller, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.clients[caller].request(method, path, json=body)

    def new_endpoint(self, shared: bool = True) -> tuple[str, str]:
        """A new endpoint of the owner's (shared with ``shared`` unless told); (id, credential)."""
        made = _ok(self.call("owner", "POST", "/v1/endpoints", {"name": "matrix"}))
        if shared:
            _ok(self.call("owner", "POST", f"/v1/endpoints/{made['endpoint_id']}/share",
                          {"username": self.names["shared"]}))
        return made["endpoint_id"], made["credential"]

    def new_function(self, shared: bool = True) -> str:
        """A new function of the owner's, shared with ``shared`` unless told."""
        function_id: str = _ok(self.call("owner", "POST", "/v1/functions",
                                         {"function": OPAQUE, "function_name": "f"}))["function_id"]
        if shared:
            _ok(self.call("owner", "POST", f"/v1/functions/{function_id}/share",
                          {"username": self.names["shared"]}))
        return function_id

    def submit(self, caller: Caller, endpoint_id: str, function_id: str,
               task_group_id: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"endpoint_id": endpoint_id,
                                "tasks": [{"function_id": function_id, "args": OPAQUE}]}
        if task_group_id:
            body["task_group_id"] = task_group_id
        return self.call(caller, "POST", "/v1/tasks", body)

    def new_task(self) -> str:
        """A new task of the owner's, waiting in the queue of ``endpoint`` (no agent runs)."""
        task_id: str = _ok(self.submit("owner", self.endpoint, self.function))["task_ids"][0]
        return task_id

    def new_timer(self) -> str:
        """A new (nightly) timer of the owner's, on the shared endpoint and function."""
        timer_id: str = _ok(self.call("owner", "POST", "/v1/timers", _timer_body(self)))["timer_id"]
        return timer_id

    def new_token(self) -> str:
        """The id of a new token of the owner's."""
        token_id: str = _ok(self.call("owner", "POST", "/v1/tokens", {"name": "matrix"}))["token_id"]
        return token_id

    def routes(self) -> set[tuple[str, str]]:
        """(METHOD, path template) of every operation in the broker's OpenAPI document."""
        doc = _ok(self.call("anonymous", "GET", "/openapi.json"))
        return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def _client(broker: Broker, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=broker.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def world(matrix_broker: Broker) -> Iterator[World]:
    tag = uuid.uuid4().hex[:6]
    names: dict[Caller, str] = {u: f"{u}-{tag}" for u in USERS}
    clients = {u: _client(matrix_broker, matrix_broker.create_user(names[u])) for u in USERS}
    clients["anonymous"] = _client(matrix_broker, None)
    w = World(names, clients)
    try:
        w.endpoint, w.credential = w.new_endpoint()
        clients["credential"] = _client(matrix_broker, w.credential)
        w.function = w.new_function()
        w.private_endpoint, _ = w.new_endpoint(shared=False)
        w.private_function = w.new_function(shared=False)
        w.group = _ok(w.call("owner", "POST", "/v1/task_groups"))["task_group_id"]
        w.task = _ok(w.submit("owner", w.endpoint, w.function, w.group))["task_ids"][0]
        w.timer = w.new_timer()
        for user in USERS:
            endpoint_id = _ok(w.call(user, "POST", "/v1/endpoints", {"name": "own"}))["endpoint_id"]
            function_id = _ok(w.call(user, "POST", "/v1/functions", {"function": OPAQUE}))[
                "function_id"]
            w.own[user] = (endpoint_id, function_id)
        yield w
    finally:
        for client in clients.values():
            client.close()


# ---- the matrix


Request = tuple[str, Any]
"""(path, JSON body or None) of one request."""
Check = Callable[[World, Caller, httpx.Response], str | None]
"""What else an answer with the expected status must show, or what must hold after it (asked
of the three users' answers); a description of what is wrong, or None."""


@dataclass(frozen=True)
class Row:
    """How to ask one route as each caller, and the status each caller must get."""

    build: Callable[[World, Caller], Request]
    expect: dict[Caller, int]
    check: Check | None = None


def allowed(owner: int = 200, shared: int = 200, stranger: int = 200, *,
            credential: int = 403, anonymous: int = 401) -> dict[Caller, int]:
    return {"owner": owner, "shared": shared, "stranger": stranger,
            "credential": credential, "anonymous": anonymous}


OBJECT = allowed(200, 200, 404)
"""Readable by its owner and by those it is shared with; unknown to anyone else."""
OWNER_ONLY = allowed(200, 403, 404)
"""Only the owner may do it; those it is shared with are told no, strangers never learn of it."""
SUBMITTER_ONLY = allowed(200, 404, 404)
"""Tasks, task groups and tokens: their maker's alone, whatever is shared."""


def _fixed(path: str, body: Any = None) -> Callable[[World, Caller], Request]:
    """A request on the world's standing objects (``{endpoint}``, ``{function}``, ...)."""
    def build(w: World, _: Caller) -> Request:
        return path.format(endpoint=w.endpoint, function=w.function, group=w.group,
                           task=w.task), body
    return build


def _fresh_endpoint(suffix: str, body: Callable[[World], Any] | None = None
                    ) -> Callable[[World, Caller], Request]:
    """A request on an endpoint made for it (the owner's, shared with ``shared``)."""
    def build(w: World, _: Caller) -> Request:
        return f"/v1/endpoints/{w.new_endpoint()[0]}{suffix}", body(w) if body else None
    return build


def _fresh_function(suffix: str, body: Callable[[World], Any] | None = None
                    ) -> Callable[[World, Caller], Request]:
    """A request on a function made for it (the owner's, shared with ``shared``)."""
    def build(w: World, _: Caller) -> Request:
        return f"/v1/functions/{w.new_function()}{suffix}", body(w) if body else None
    return build


def _shared_submission(w: World, _: Caller) -> Request:
    """Users submit to the owner's shared endpoint with the owner's shared function."""
    return "/v1/tasks", {"endpoint_id": w.endpoint,
                         "tasks": [{"function_id": w.function, "args": OPAQUE}]}


def _cancel(w: World, _: Caller) -> Request:
    return "/v1/tasks/cancel", {"task_ids": [w.new_task()]}


def _cancel_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    (task_id,) = json.loads(response.request.content)["task_ids"]
    answer = response.json()
    if caller == "owner":
        return None if answer["cancelled"] == [task_id] else f"owner's cancel: {answer}"
    state = _ok(w.call("owner", "GET", f"/v1/tasks/{task_id}"))["state"]
    if answer != {"cancelled": [], "unchanged": {task_id: "not_found"}} or state == "cancelled":
        return f"{caller} cancelled the owner's task (answer {answer}, task now {state})"
    return None


def _status_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    tasks = response.json()["tasks"]
    if caller == "owner":
        return None if list(tasks) == [w.task] else f"the owner's status list: {list(tasks)}"
    return None if tasks == {} else f"{caller} was shown the owner's task: {list(tasks)}"


def _endpoints_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    roles = {e["endpoint_id"]: e["role"] for e in response.json()["endpoints"]}
    expected = {
        "owner": {w.endpoint: "owner", w.private_endpoint: "owner"},
        "shared": {w.endpoint: "shared"},
        "stranger": {},
    }[caller]
    seen = {e: r for e, r in roles.items() if e in (w.endpoint, w.private_endpoint)}
    return None if seen == expected else f"{caller} sees the owner's endpoints as {seen}"


def _tokens_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    mine = {t["token_id"] for t in response.json()["tokens"]}
    others = set()
    for other in USERS:
        if other != caller:
            others |= {t["token_id"] for t in _ok(w.call(other, "GET", "/v1/tokens"))["tokens"]}
    return f"{caller} sees tokens of other users: {mine & others}" if mine & others else None


def _sharing_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    if caller != "owner":
        return None
    shared_with = response.json()["shared_with"]
    return None if shared_with == [w.names["shared"]] else f"shared with {shared_with}"


def _object_path(response: httpx.Response) -> str:
    """The path of the endpoint or function a request was about (``/v1/KIND/ID``)."""
    return "/".join(response.request.url.path.split("/")[:4])


def _deleted_by_owner_only(w: World, caller: Caller, response: httpx.Response) -> str | None:
    after = w.call("owner", "GET", _object_path(response)).status_code
    expected = 404 if caller == "owner" else 200
    return None if after == expected else f"afterwards the owner reads it: {after}"


def _revoked_by_owner_only(w: World, caller: Caller, response: httpx.Response) -> str | None:
    token_id = response.request.url.path.rsplit("/", 1)[-1]
    tokens = {t["token_id"] for t in _ok(w.call("owner", "GET", "/v1/tokens"))["tokens"]}
    return None if (token_id in tokens) == (caller != "owner") else (
        f"afterwards the owner's token is {'listed' if token_id in tokens else 'gone'}")


def _shared_with_stranger_by_owner_only(
    w: World, caller: Caller, response: httpx.Response
) -> str | None:
    after = w.call("stranger", "GET", _object_path(response)).status_code
    expected = 200 if caller == "owner" else 404
    return None if after == expected else f"afterwards the stranger reads it: {after}"


def _unshared_by_owner_only(w: World, caller: Caller, response: httpx.Response) -> str | None:
    after = w.call("shared", "GET", _object_path(response)).status_code
    expected = 404 if caller == "owner" else 200
    return None if after == expected else f"afterwards the shared user reads it: {after}"


LEAVE = allowed(400, 200, 404)
"""Only a user something is shared with leaves it; its owner is told to delete it instead."""


def _left_by_the_shared_user_only(w: World, caller: Caller, response: httpx.Response
                                  ) -> str | None:
    after = w.call("shared", "GET", _object_path(response)).status_code
    expected = 404 if caller == "shared" else 200
    return None if after == expected else f"after {caller}'s leave the shared user reads it: {after}"


def _share_with_stranger(w: World) -> dict[str, str]:
    return {"username": w.names["stranger"]}


def _unshare_shared(w: World) -> dict[str, str]:
    return {"username": w.names["shared"]}


HEALTH = allowed(credential=200, anonymous=200)

def _whoami_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    me = response.json()
    return None if me["username"] == w.names[caller] else f"{caller} is told they are {me}"


def _timer_body(w: World) -> dict[str, Any]:
    return {"endpoint_id": w.endpoint, "function_id": w.function, "args": OPAQUE,
            "cron": "0 2 * * *"}


def _timers_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    listed = {t["timer_id"] for t in response.json()["timers"]}
    if caller == "owner":
        return None if w.timer in listed else f"the owner's list lacks their timer: {listed}"
    return f"{caller} was shown the owner's timer" if w.timer in listed else None


def _paused_by_owner_only(w: World, caller: Caller, response: httpx.Response) -> str | None:
    state = _ok(w.call("owner", "GET", response.request.url.path.removesuffix("/pause")))["state"]
    expected = "paused" if caller == "owner" else "active"
    return None if state == expected else f"afterwards the owner's timer is {state}"


def _groups_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    listed = {g["task_group_id"] for g in response.json()["task_groups"]}
    if caller == "owner":
        return None if w.group in listed else f"the owner's groups lack theirs: {listed}"
    return f"{caller} was shown the owner's task group" if w.group in listed else None


def _tasks_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    if caller != "owner":
        return None  # told 404: the status says it all
    listed = [t["task_id"] for t in response.json()["tasks"]]
    return None if listed == [w.task] else f"the owner's group lists {listed}"


def _upload(w: World, _: Caller) -> Request:
    return "/v1/blobs", OPAQUE


def _owners_blob(w: World, _: Caller) -> Request:
    """A blob the owner uploaded: only its owner reads it, even with its id (issue 20: an id
    read by a task on a shared endpoint was enough before)."""
    return f"/v1/blobs/{_ok_created(w.call('owner', 'POST', '/v1/blobs', OPAQUE))}", None


def _ok_created(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text[:300]
    blob_id: str = response.json()["blob_id"]
    return blob_id


def _blob_check(w: World, caller: Caller, response: httpx.Response) -> str | None:
    if caller != "owner":
        return None
    return None if response.content == json.dumps(OPAQUE).encode() else (
        f"{caller} read {response.content[:80]!r}")


MATRIX: dict[tuple[str, str], Row] = {
    ("GET", "/v1/health"): Row(_fixed("/v1/health"), HEALTH),
    # the data plane and listings
    ("GET", "/v1/limits"): Row(_fixed("/v1/limits"), allowed()),
    ("POST", "/v1/blobs"): Row(_upload, allowed(201, 201, 201)),
    ("GET", "/v1/blobs/{blob_id}"): Row(_owners_blob, SUBMITTER_ONLY, _blob_check),
    ("GET", "/v1/task_groups"): Row(_fixed("/v1/task_groups"), allowed(), _groups_check),
    ("GET", "/v1/tasks"): Row(_fixed("/v1/tasks?task_group_id={group}"), SUBMITTER_ONLY,
                              _tasks_check),
    # functions
    ("POST", "/v1/functions"): Row(_fixed("/v1/functions", {"function": OPAQUE}), allowed()),
    ("GET", "/v1/functions/{function_id}"): Row(_fixed("/v1/functions/{function}"), OBJECT),
    ("POST", "/v1/functions/{function_id}/share"):
        Row(_fresh_function("/share", _share_with_stranger), OWNER_ONLY,
            _shared_with_stranger_by_owner_only),
    ("POST", "/v1/functions/{function_id}/unshare"):
        Row(_fresh_function("/unshare", _unshare_shared), OWNER_ONLY, _unshared_by_owner_only),
    ("GET", "/v1/functions/{function_id}/sharing"):
        Row(_fixed("/v1/functions/{function}/sharing"), OWNER_ONLY, _sharing_check),
    ("POST", "/v1/functions/{function_id}/leave"):
        Row(_fresh_function("/leave"), LEAVE, _left_by_the_shared_user_only),
    ("DELETE", "/v1/functions/{function_id}"): Row(_fresh_function(""), OWNER_ONLY,
                                                     _deleted_by_owner_only),
    # endpoints
    ("GET", "/v1/endpoints"): Row(_fixed("/v1/endpoints"), allowed(), _endpoints_check),
    ("POST", "/v1/endpoints"): Row(_fixed("/v1/endpoints", {"name": "theirs"}), allowed()),
    ("GET", "/v1/endpoints/{endpoint_id}"): Row(_fixed("/v1/endpoints/{endpoint}"), OBJECT),
    ("GET", "/v1/endpoints/{endpoint_id}/status"):
        Row(_fixed("/v1/endpoints/{endpoint}/status"), OBJECT),
    ("POST", "/v1/endpoints/{endpoint_id}/share"):
        Row(_fresh_endpoint("/share", _share_with_stranger), OWNER_ONLY,
            _shared_with_stranger_by_owner_only),
    ("POST", "/v1/endpoints/{endpoint_id}/unshare"):
        Row(_fresh_endpoint("/unshare", _unshare_shared), OWNER_ONLY, _unshared_by_owner_only),
    ("GET", "/v1/endpoints/{endpoint_id}/sharing"):
        Row(_fixed("/v1/endpoints/{endpoint}/sharing"), OWNER_ONLY, _sharing_check),
    ("POST", "/v1/endpoints/{endpoint_id}/credential"):
        Row(_fresh_endpoint("/credential"), OWNER_ONLY),
    ("POST", "/v1/endpoints/{endpoint_id}/stop"):
        Row(_fresh_endpoint("/stop"), OWNER_ONLY),
    ("POST", "/v1/endpoints/{endpoint_id}/leave"):
        Row(_fresh_endpoint("/leave"), LEAVE, _left_by_the_shared_user_only),
    ("DELETE", "/v1/endpoints/{endpoint_id}"): Row(_fresh_endpoint(""), OWNER_ONLY,
                                                     _deleted_by_owner_only),
    # tokens: each user's own
    ("GET", "/v1/tokens"): Row(_fixed("/v1/tokens"), allowed(), _tokens_check),
    ("POST", "/v1/tokens"): Row(_fixed("/v1/tokens", {"name": "matrix"}), allowed()),
    ("DELETE", "/v1/tokens/{token_id}"):
        Row(lambda w, _: (f"/v1/tokens/{w.new_token()}", None), SUBMITTER_ONLY,
            _revoked_by_owner_only),
    # task groups and tasks: only their submitter's, even on a shared endpoint
    ("POST", "/v1/task_groups"): Row(_fixed("/v1/task_groups"), allowed()),
    ("GET", "/v1/task_groups/{task_group_id}"):
        Row(_fixed("/v1/task_groups/{group}"), SUBMITTER_ONLY),
    ("POST", "/v1/tasks"): Row(_shared_submission, OBJECT),
    ("GET", "/v1/tasks/{task_id}"): Row(_fixed("/v1/tasks/{task}"), SUBMITTER_ONLY),
    ("POST", "/v1/tasks/status"):
        Row(lambda w, _: ("/v1/tasks/status", {"task_ids": [w.task]}), allowed(), _status_check),
    ("POST", "/v1/tasks/cancel"): Row(_cancel, allowed(), _cancel_check),
    # identity: everyone sees themselves, and only themselves
    ("GET", "/v1/whoami"): Row(_fixed("/v1/whoami"), allowed(), _whoami_check),
    # timers: their creator's alone; creating one needs the endpoint and function usable
    ("POST", "/v1/timers"): Row(lambda w, _: ("/v1/timers", _timer_body(w)), OBJECT),
    ("GET", "/v1/timers"): Row(_fixed("/v1/timers"), allowed(), _timers_check),
    ("GET", "/v1/timers/{timer_id}"): Row(lambda w, _: (f"/v1/timers/{w.timer}", None),
                                          SUBMITTER_ONLY),
    ("POST", "/v1/timers/{timer_id}/pause"):
        Row(lambda w, _: (f"/v1/timers/{w.new_timer()}/pause", None), SUBMITTER_ONLY,
            _paused_by_owner_only),
    ("POST", "/v1/timers/{timer_id}/resume"):
        Row(lambda w, _: (f"/v1/timers/{w.new_timer()}/resume", None), SUBMITTER_ONLY),
    ("DELETE", "/v1/timers/{timer_id}"):
        Row(lambda w, _: (f"/v1/timers/{w.new_timer()}", None), SUBMITTER_ONLY,
            _deleted_by_owner_only),
}


def _ask(w: World, route: tuple[str, str], caller: Caller) -> str | None:
    """Ask ``route`` as ``caller``; what is wrong with the answer, or None."""
    method, template = route
    row = MATRIX[route]
    path, body = row.build(w, caller)
    response = w.call(caller, method, path, body)
    expected = row.expect[caller]
    said = f"{method} {template} as {caller}: {response.status_code} {response.text[:300]}"
    if response.status_code != expected:
        return f"{said} (expected {expected})"
    code = ERROR_CODES.get(expected)
    if code and response.json().get("error") != code:
        return f"{said} (expected the error code {code!r})"
    if row.check and caller in USERS:
        problem = row.check(w, caller, response)
        return f"{method} {template} as {caller}: {problem}" if problem else None
    return None


def test_every_route_answers_every_caller_exactly_as_allowed(world: World) -> None:
    routes = world.routes()
    unknown = sorted(routes - MATRIX.keys())
    assert not unknown, (
        f"routes with no expectation in the access matrix: {unknown}; add a Row for each to "
        "MATRIX in tests/integration/test_access_matrix.py")
    gone = sorted(MATRIX.keys() - routes)
    assert not gone, f"the matrix expects routes the broker no longer has: {gone}; remove them"
    deletes_last = sorted(routes, key=lambda r: (r[0] == "DELETE", r[1], r[0]))
    wrong = [problem for route, caller in itertools.product(deletes_last, CALLERS)
             if (problem := _ask(world, route, caller))]
    assert not wrong, "answers the access rules do not allow:\n" + "\n".join(wrong)


# ---- what the matrix cannot show in one request


def test_a_task_is_its_submitters_alone_even_on_the_owners_endpoint(world: World) -> None:
    submitted = _ok(world.submit("shared", world.endpoint, world.function))
    (task_id,), group = submitted["task_ids"], submitted["task_group_id"]
    assert _ok(world.call("shared", "GET", f"/v1/tasks/{task_id}"))["endpoint_id"] == world.endpoint
    assert _ok(world.call("shared", "GET", f"/v1/task_groups/{group}"))["task_ids"] == [task_id]
    for caller in ("owner", "stranger"):
        assert world.call(caller, "GET", f"/v1/tasks/{task_id}").status_code == 404
        assert world.call(caller, "GET", f"/v1/task_groups/{group}").status_code == 404
        assert _ok(world.call(caller, "POST", "/v1/tasks/status",
                              {"task_ids": [task_id]}))["tasks"] == {}
        # nor can anyone add tasks to another user's task group
        assert world.submit(caller, *world.own[caller], task_group_id=group).status_code == 404
    assert _ok(world.call("stranger", "POST", "/v1/tasks/cancel", {"task_ids": [task_id]})) == {
        "cancelled": [], "unchanged": {task_id: "not_found"}}
    assert _ok(world.call("shared", "GET", f"/v1/tasks/{task_id}"))["state"] != "cancelled"
    # The endpoint's owner may stop what runs on their endpoint (issue 20), still without
    # reading it; the submitter is told who stopped it.
    assert _ok(world.call("owner", "POST", "/v1/tasks/cancel", {"task_ids": [task_id]})) == {
        "cancelled": [task_id], "unchanged": {}}
    stopped = _ok(world.call("shared", "GET", f"/v1/tasks/{task_id}"))
    assert stopped["state"] == "cancelled" and "owner" in stopped["error"], stopped


def test_sharing_an_endpoint_shares_neither_the_owners_functions_nor_other_endpoints(
    world: World,
) -> None:
    assert world.submit("shared", world.endpoint, world.private_function).status_code == 404
    assert world.submit("shared", world.private_endpoint, world.function).status_code == 404
    assert world.call("shared", "GET", f"/v1/endpoints/{world.private_endpoint}").status_code == 404
    assert world.call("shared", "GET", f"/v1/functions/{world.private_function}").status_code == 404
    # the shared user's own function runs on the shared endpoint; a stranger's does not
    assert world.submit("shared", world.endpoint, world.own["shared"][1]).status_code == 200
    assert world.submit("stranger", world.endpoint, world.own["stranger"][1]).status_code == 404
    # and the shared function runs on the shared user's own endpoint
    assert world.submit("shared", world.own["shared"][0], world.function).status_code == 200
    assert world.submit("stranger", world.own["stranger"][0], world.function).status_code == 404


def test_a_public_function_is_everyones_to_run_until_unshared(world: World) -> None:
    function_id = world.new_function(shared=False)
    stranger_endpoint = world.own["stranger"][0]
    assert world.call("stranger", "GET", f"/v1/functions/{function_id}").status_code == 404
    sharing = _ok(world.call("owner", "POST", f"/v1/functions/{function_id}/share",
                             {"public": True}))
    assert sharing == {"function_id": function_id, "shared_with": [], "public": True}

    seen = _ok(world.call("stranger", "GET", f"/v1/functions/{function_id}"))
    assert (seen["role"], seen["public"], seen["function"]) == ("shared", True, OPAQUE)
    _ok(world.submit("stranger", stranger_endpoint, function_id))
    for method, suffix in (("GET", "/sharing"), ("DELETE", ""), ("POST", "/unshare")):
        answer = world.call("stranger", method, f"/v1/functions/{function_id}{suffix}",
                            {"public": True} if method == "POST" else None)
        assert answer.status_code == 403, (method, suffix, answer.text)

    # this replica drops its cached copy at once (other replicas within the owner cache's 5 s)
    _ok(world.call("owner", "POST", f"/v1/functions/{function_id}/unshare", {"public": True}))
    assert world.call("stranger", "GET", f"/v1/functions/{function_id}").status_code == 404
    assert world.submit("stranger", stranger_endpoint, function_id).status_code == 404
    assert _ok(world.call("owner", "GET", f"/v1/functions/{function_id}/sharing"))["public"] is False


def test_unsharing_takes_access_back_but_leaves_the_users_tasks_theirs(world: World) -> None:
    endpoint_id, function_id = world.new_endpoint()[0], world.new_function()
    task_id = _ok(world.submit("shared", endpoint_id, function_id))["task_ids"][0]
    roles = {e["endpoint_id"]: e["role"]
             for e in _ok(world.call("shared", "GET", "/v1/endpoints"))["endpoints"]}
    assert roles.get(endpoint_id) == "shared"

    unshare = {"username": world.names["shared"]}
    assert _ok(world.call("owner", "POST", f"/v1/endpoints/{endpoint_id}/unshare", unshare)) == {
        "endpoint_id": endpoint_id, "shared_with": [], "warning": None}
    assert _ok(world.call("owner", "POST", f"/v1/functions/{function_id}/unshare", unshare)) == {
        "function_id": function_id, "shared_with": [], "public": False}

    for path in (f"/v1/endpoints/{endpoint_id}", f"/v1/endpoints/{endpoint_id}/status",
                 f"/v1/functions/{function_id}"):
        assert world.call("shared", "GET", path).status_code == 404, path
    assert world.submit("shared", endpoint_id, world.own["shared"][1]).status_code == 404
    assert world.submit("shared", world.own["shared"][0], function_id).status_code == 404
    endpoints = _ok(world.call("shared", "GET", "/v1/endpoints"))["endpoints"]
    assert endpoint_id not in {e["endpoint_id"] for e in endpoints}
    task = _ok(world.call("shared", "GET", f"/v1/tasks/{task_id}"))
    assert task["state"] == "cancelled" and "stopped sharing" in task["error"], task  # theirs


def test_sharing_names_an_existing_other_user(world: World) -> None:
    endpoint_id, function_id = world.new_endpoint(shared=False)[0], world.new_function(shared=False)
    for path in (f"/v1/endpoints/{endpoint_id}/share", f"/v1/functions/{function_id}/share"):
        nobody = world.call("owner", "POST", path, {"username": f"nobody-{uuid.uuid4().hex[:6]}"})
        assert (nobody.status_code, nobody.json()["error"]) == (404, "not_found"), nobody.text
        themselves = world.call("owner", "POST", path, {"username": world.names["owner"]})
        assert themselves.status_code == 400, themselves.text
    public_endpoint = world.call("owner", "POST", f"/v1/endpoints/{endpoint_id}/share",
                                 {"public": True})
    assert public_endpoint.status_code == 400, public_endpoint.text
