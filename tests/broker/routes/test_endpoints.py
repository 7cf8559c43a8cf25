"""``/v1/endpoints`` (farcall.broker.routes.endpoints): register, list, read, status, delete,
the quota. What deletion does to waiting tasks: tests/broker/test_endpoint_control.py."""

from __future__ import annotations

from farcall.broker import auth
from farcall.broker.settings import Settings
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api


def test_register_list_delete_and_the_credential_stops_working(api: Api) -> None:
    alice = api.user("alice")
    ep = api.endpoint(alice)
    assert ep["credential"].startswith("fce_") and ep["name"] == "ep"
    listed = api.client.get("/v1/endpoints", headers=alice).json()["endpoints"]
    assert [(e["endpoint_id"], e["status"]) for e in listed] == [(ep["endpoint_id"], "offline")]
    r = api.client.delete(f"/v1/endpoints/{ep['endpoint_id']}", headers=alice)
    assert r.json() == {"endpoint_id": ep["endpoint_id"], "deleted": True}
    assert api.client.get(f"/v1/endpoints/{ep['endpoint_id']}", headers=alice).status_code == 404
    assert api.call(auth.authenticate, api.store.users, ep["credential"]) is None


def test_the_registration_names_the_broker_as_health_does(api: Api) -> None:
    """What an endpoint keeps beside its credential, to know the broker under any URL."""
    alice = api.user("alice")
    first, second = api.endpoint(alice), api.endpoint(alice)
    broker_id = api.client.get("/v1/health").json()["broker_id"]
    assert broker_id and first["broker_id"] == second["broker_id"] == broker_id


def test_status_of_an_endpoint_that_never_connected(api: Api) -> None:
    alice = api.user("alice")
    eid = api.endpoint(alice)["endpoint_id"]
    st = api.client.get(f"/v1/endpoints/{eid}/status", headers=alice).json()
    assert (st["endpoint_id"], st["name"], st["status"]) == (eid, "ep", "offline")
    assert st["last_heartbeat"] is None and st["queued_tasks"] == 0


def test_a_shared_endpoint_is_listed_for_the_sharee_who_may_not_delete_it(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    eid = api.endpoint(alice)["endpoint_id"]
    api.client.post(f"/v1/endpoints/{eid}/share", json={"username": "bob"}, headers=alice)
    (listed,) = api.client.get("/v1/endpoints", headers=bob).json()["endpoints"]
    assert (listed["endpoint_id"], listed["role"]) == (eid, "shared")
    r = api.client.delete(f"/v1/endpoints/{eid}", headers=bob)
    assert r.status_code == 403 and "only its owner" in r.json()["message"]


def test_a_user_owns_at_most_max_endpoints(make_api: MakeApi) -> None:
    api = make_api(Settings(auth_failure_rate=0, max_endpoints=1))
    alice = api.user("alice")
    api.endpoint(alice)
    r = api.client.post("/v1/endpoints", json={"name": "two"}, headers=alice)
    assert r.status_code == 403 and "FARCALL_MAX_ENDPOINTS" in r.json()["message"]


def test_stop_is_for_the_owner_and_says_when_there_was_nothing_to_stop(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    eid = api.endpoint(alice)["endpoint_id"]
    r = api.client.post(f"/v1/endpoints/{eid}/stop", headers=alice)
    assert r.json() == {"endpoint_id": eid, "stopping": False}, "never connected: nothing to stop"
    api.client.post(f"/v1/endpoints/{eid}/share", json={"username": "bob"}, headers=alice)
    r = api.client.post(f"/v1/endpoints/{eid}/stop", headers=bob)
    assert r.status_code == 403 and "only its owner" in r.json()["message"]
    assert api.client.post("/v1/endpoints/no-such/stop", headers=alice).status_code == 404
