"""``GET /v1/task_groups`` and ``GET /v1/tasks``: a user's recent work, newest first, theirs only."""

from __future__ import annotations

from typing import Any

import pytest

from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api

Headers = dict[str, str]


class Listing(Api):
    def post(self, path: str, body: Any, who: Headers) -> Any:
        r = self.client.post(path, json=body, headers=who)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, path: str, who: Headers, status: int = 200) -> Any:
        r = self.client.get(path, headers=who)
        assert r.status_code == status, r.text
        return r.json()

    def submit(self, who: Headers, endpoint_id: str, function_id: str, n: int,
               group: str | None = None) -> dict[str, Any]:
        tasks = [{"function_id": function_id, "args": f"A{i}"} for i in range(n)]
        return dict(self.post("/v1/tasks", {"endpoint_id": endpoint_id, "tasks": tasks,
                                            "task_group_id": group}, who))


@pytest.fixture
def api(make_api: MakeApi) -> Listing:
    app = make_api()
    return Listing(app.client, app.services)


def test_tasks_newest_first_across_groups(api: Listing) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    fid = api.post("/v1/functions", {"function": "F", "function_name": "simulate"}, alice)[
        "function_id"]
    eid = api.post("/v1/endpoints", {"name": "ep"}, alice)["endpoint_id"]
    first = api.submit(alice, eid, fid, 3)
    second = api.submit(alice, eid, fid, 2)
    again = api.submit(alice, eid, fid, 1, group=first["task_group_id"])  # the old group, later
    newest = again["task_ids"] + second["task_ids"][::-1] + first["task_ids"][::-1]

    listed = api.get("/v1/tasks?limit=4", alice)["tasks"]
    assert [t["task_id"] for t in listed] == newest[:4]
    top = listed[0]
    assert top["function_name"] == "simulate" and top["function_id"] == fid
    assert top["state"] == "waiting-for-endpoint" and top["completed_at"] is None
    assert top["task_group_id"] == first["task_group_id"] and top["endpoint_id"] == eid
    assert top["received_at"] >= listed[1]["received_at"]
    assert [t["task_id"] for t in api.get("/v1/tasks?limit=100", alice)["tasks"]] == newest

    in_group = api.get(f"/v1/tasks?task_group_id={first['task_group_id']}&limit=3", alice)
    assert [t["task_id"] for t in in_group["tasks"]] == (again["task_ids"]
                                                          + first["task_ids"][::-1][:2])

    groups = api.get("/v1/task_groups", alice)["task_groups"]
    assert [(g["task_group_id"], g["task_count"]) for g in groups] == [
        (first["task_group_id"], 4), (second["task_group_id"], 2)]
    assert groups[0]["last_active"] > groups[0]["created_at"]

    assert api.get("/v1/tasks", bob) == {"tasks": []}
    assert api.get("/v1/task_groups", bob) == {"task_groups": []}
    for gid in (first["task_group_id"], "0" * 8):
        refused = api.get(f"/v1/tasks?task_group_id={gid}", bob, status=404)
        assert refused["error"] == "not_found" and "GET /v1/task_groups" in refused["message"]


def test_function_names_only_of_functions_still_usable(api: Listing) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    fid = api.post("/v1/functions", {"function": "F", "function_name": "secret"}, alice)[
        "function_id"]
    api.post(f"/v1/functions/{fid}/share", {"username": "bob"}, alice)
    eid = api.post("/v1/endpoints", {"name": "ep"}, bob)["endpoint_id"]
    api.submit(bob, eid, fid, 1)
    assert api.get("/v1/tasks", bob)["tasks"][0]["function_name"] == "secret"
    api.post(f"/v1/functions/{fid}/unshare", {"username": "bob"}, alice)
    (task,) = api.get("/v1/tasks", bob)["tasks"]
    assert task["function_name"] == "" and task["function_id"] == fid


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "task_group_id="])
def test_bad_listing_queries_say_what_to_fix(api: Listing, query: str) -> None:
    alice = api.user("alice")
    r = api.client.get(f"/v1/tasks?{query}", headers=alice)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
