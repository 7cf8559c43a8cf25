"""``/v1/functions`` (farcall.broker.routes.functions): register, read, delete, the quota."""

from __future__ import annotations

from farcall.broker.settings import Settings
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api


def test_register_read_and_delete(api: Api) -> None:
    alice = api.user("alice")
    fid = api.function(alice, "CODE")
    got = api.client.get(f"/v1/functions/{fid}", headers=alice).json()
    assert got["function"] == "CODE" and got["function_name"] == "f" and "user_id" not in got
    assert got["role"] == "owner" and got["public"] is False
    assert api.client.delete(f"/v1/functions/{fid}", headers=alice).json() == {
        "function_id": fid,
        "deleted": True,
    }
    assert api.client.get(f"/v1/functions/{fid}", headers=alice).status_code == 404


def test_a_shared_function_is_read_but_not_deleted_by_the_sharee(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    fid = api.function(alice)
    api.client.post(f"/v1/functions/{fid}/share", json={"username": "bob"}, headers=alice)
    assert api.client.get(f"/v1/functions/{fid}", headers=bob).json()["role"] == "shared"
    r = api.client.delete(f"/v1/functions/{fid}", headers=bob)
    assert r.status_code == 403 and "only its owner" in r.json()["message"]


def test_a_user_has_at_most_max_functions(make_api: MakeApi) -> None:
    api = make_api(Settings(auth_failure_rate=0, max_functions=2))
    alice = api.user("alice")
    api.function(alice), api.function(alice)
    r = api.client.post("/v1/functions", json={"function": "F"}, headers=alice)
    assert r.status_code == 403 and "FARCALL_MAX_FUNCTIONS" in r.json()["message"]
    assert api.client.post("/v1/functions", json={"function": "F"},
                           headers=api.user("bob")).status_code == 200
