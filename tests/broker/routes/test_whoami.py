"""``GET /v1/whoami`` (farcall.broker.routes.whoami): the name and the identity id by which the
Action Provider API names the user."""

from __future__ import annotations

from tests.broker.helpers import Api


def test_whoami_names_the_tokens_user_and_their_identity_id(api: Api) -> None:
    user_id, alice = api.new_user("alice")
    assert api.client.get("/v1/whoami", headers=alice).json() == {
        "username": "alice", "identity_id": user_id}
    assert api.client.get("/v1/whoami").status_code == 401
