"""``/v1/tokens`` (farcall.broker.routes.tokens): a user's own tokens, created, listed and
revoked. Revocation across replicas: tests/integration/test_tokens.py."""

from __future__ import annotations

from tests.broker.helpers import Api


def test_create_list_and_revoke_a_token(api: Api) -> None:
    alice = api.user("alice")
    made = api.client.post("/v1/tokens", json={"name": "laptop"}, headers=alice).json()
    assert made["token"].startswith("fcu_") and made["name"] == "laptop"
    listed = api.client.get("/v1/tokens", headers=alice).json()["tokens"]
    assert [t["name"] for t in listed] == ["created with the user", "laptop"], "oldest first"
    assert all("token" not in t for t in listed), "never the tokens themselves"
    laptop = {"Authorization": f"Bearer {made['token']}"}
    assert api.client.get("/v1/whoami", headers=laptop).json()["username"] == "alice"
    r = api.client.delete(f"/v1/tokens/{made['token_id']}", headers=alice)
    assert r.json() == {"token_id": made["token_id"], "revoked": True}
    assert api.client.get("/v1/whoami", headers=laptop).status_code == 401
    assert api.client.delete(f"/v1/tokens/{made['token_id']}", headers=alice).status_code == 404


def test_a_token_without_a_body_and_another_users_token(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    made = api.client.post("/v1/tokens", headers=alice).json()
    assert made["name"] == ""
    r = api.client.delete(f"/v1/tokens/{made['token_id']}", headers=bob)
    assert r.status_code == 404 and "GET /v1/tokens" in r.json()["message"]
    assert api.client.get("/v1/whoami", headers={
        "Authorization": f"Bearer {made['token']}"}).status_code == 200
