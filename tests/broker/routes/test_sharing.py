"""Sharing functions and endpoints (farcall.broker.routes.sharing): with named users, with
everyone (functions only), undone by unshare, and the owner's alone to change or read."""

from __future__ import annotations

from farcall.broker.routes.sharing import SINGLE_USER_WARNING
from tests.broker.helpers import Api


def test_a_function_shared_with_a_user_then_everyone_then_no_one(api: Api) -> None:
    alice, bob, carol = api.user("alice"), api.user("bob"), api.user("carol")
    fid = api.function(alice)
    r = api.client.post(f"/v1/functions/{fid}/share", json={"username": "bob"}, headers=alice)
    assert r.json() == {"function_id": fid, "shared_with": ["bob"], "public": False}
    assert api.client.get(f"/v1/functions/{fid}", headers=bob).status_code == 200
    assert api.client.get(f"/v1/functions/{fid}", headers=carol).status_code == 404
    r = api.client.post(f"/v1/functions/{fid}/share", json={"public": True}, headers=alice)
    assert r.json()["public"] is True
    assert api.client.get(f"/v1/functions/{fid}", headers=carol).status_code == 200
    api.client.post(f"/v1/functions/{fid}/unshare", json={"public": True}, headers=alice)
    api.client.post(f"/v1/functions/{fid}/unshare", json={"username": "bob"}, headers=alice)
    assert api.client.get(f"/v1/functions/{fid}/sharing", headers=alice).json() == {
        "function_id": fid, "shared_with": [], "public": False}
    assert api.client.get(f"/v1/functions/{fid}", headers=bob).status_code == 404


def test_an_endpoint_is_shared_with_named_users_only(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    eid = api.endpoint(alice)["endpoint_id"]
    r = api.client.post(f"/v1/endpoints/{eid}/share", json={"public": True}, headers=alice)
    assert r.status_code == 400 and "named users only" in r.json()["message"]
    r = api.client.post(f"/v1/endpoints/{eid}/share", json={"username": "bob"}, headers=alice)
    assert r.json() == {"endpoint_id": eid, "shared_with": ["bob"],
                        "warning": SINGLE_USER_WARNING.format(endpoint_id=eid)}
    assert "runs every task as its owner's Unix account" in r.json()["warning"]
    assert api.client.get(f"/v1/endpoints/{eid}/status", headers=bob).status_code == 200
    r = api.client.post(f"/v1/endpoints/{eid}/unshare", json={"username": "bob"}, headers=alice)
    assert r.json()["shared_with"] == [] and r.json()["warning"] is None
    assert api.client.get(f"/v1/endpoints/{eid}/status", headers=bob).status_code == 404


def test_sharing_names_a_known_other_user_and_is_the_owners_to_change(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    fid = api.function(alice)
    r = api.client.post(f"/v1/functions/{fid}/share", json={"username": "nobody"}, headers=alice)
    assert r.status_code == 404 and "no user named 'nobody'" in r.json()["message"]
    r = api.client.post(f"/v1/functions/{fid}/share", json={"username": "alice"}, headers=alice)
    assert r.status_code == 400 and "you own it already" in r.json()["message"]
    r = api.client.post(f"/v1/functions/{fid}/share", json={}, headers=alice)
    assert r.status_code == 400 and "name a user" in r.json()["message"]
    api.client.post(f"/v1/functions/{fid}/share", json={"username": "bob"}, headers=alice)
    for path in ("share", "unshare"):
        r = api.client.post(f"/v1/functions/{fid}/{path}", json={"username": "bob"}, headers=bob)
        assert r.status_code == 403, path
    assert api.client.get(f"/v1/functions/{fid}/sharing", headers=bob).status_code == 403


def test_a_share_names_its_owner_and_the_user_shared_with_can_leave_it(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    eid = api.endpoint(alice)["endpoint_id"]
    fid = api.function(alice)
    api.client.post(f"/v1/endpoints/{eid}/share", json={"username": "bob"}, headers=alice)
    api.client.post(f"/v1/functions/{fid}/share", json={"username": "bob"}, headers=alice)
    listed = api.client.get("/v1/endpoints", headers=bob).json()["endpoints"]
    assert [(e["endpoint_id"], e["role"], e["shared_by"]) for e in listed] == [
        (eid, "shared", "alice")]
    assert api.client.get("/v1/endpoints", headers=alice).json()["endpoints"][0]["shared_by"] is None
    assert api.client.get(f"/v1/functions/{fid}", headers=bob).json()["shared_by"] == "alice"

    r = api.client.post(f"/v1/endpoints/{eid}/leave", headers=alice)
    assert r.status_code == 400 and "is yours; delete it instead" in r.json()["message"]
    r = api.client.post(f"/v1/endpoints/{eid}/leave", headers=bob)
    assert r.json() == {"endpoint_id": eid, "left": True}
    assert api.client.get("/v1/endpoints", headers=bob).json()["endpoints"] == []
    assert api.client.get(f"/v1/endpoints/{eid}/sharing", headers=alice).json()["shared_with"] == []
    assert api.client.post(f"/v1/endpoints/{eid}/leave", headers=bob).status_code == 404

    assert api.client.post(f"/v1/functions/{fid}/leave", headers=bob).json() == {
        "function_id": fid, "left": True}
    assert api.client.get(f"/v1/functions/{fid}", headers=bob).status_code == 404
    api.client.post(f"/v1/functions/{fid}/share", json={"public": True}, headers=alice)
    r = api.client.post(f"/v1/functions/{fid}/leave", headers=bob)
    assert r.status_code == 400 and "public" in r.json()["message"]
