"""Client: tokens, sharing and refusals (403), each call's request and answer, on the fake broker."""

from __future__ import annotations

from typing import Any

import pytest

from farcall.client import broker_error
from farcall.errors import NotFound, PermissionDenied
from tests.sdk.fake_broker import FakeBroker


def test_create_list_and_revoke_tokens() -> None:
    fake = FakeBroker()
    client = fake.client()
    laptop = client.create_token("laptop")
    assert set(laptop) == {"token_id", "token", "name", "created_at"}
    assert laptop["name"] == "laptop" and laptop["token"].startswith("fcu_")
    unnamed = client.create_token()
    assert unnamed["name"] == ""
    listed = client.list_tokens()
    assert [t["token_id"] for t in listed] == [laptop["token_id"], unnamed["token_id"]]
    assert all("token" not in t for t in listed)
    assert client.revoke_token(laptop["token_id"]) == {"token_id": laptop["token_id"], "revoked": True}
    assert [t["token_id"] for t in client.list_tokens()] == [unnamed["token_id"]]
    with pytest.raises(NotFound, match="you have no token"):
        client.revoke_token(laptop["token_id"])
    assert fake.requests[:4] == [
        ("POST", "/tokens", {"name": "laptop"}),
        ("POST", "/tokens", {"name": ""}),
        ("GET", "/tokens", None),
        ("DELETE", f"/tokens/{laptop['token_id']}", None),
    ]


def test_a_token_name_over_the_limit_fails_before_any_request() -> None:
    fake = FakeBroker()
    with pytest.raises(ValueError, match="at most 200 characters"):
        fake.client().create_token("x" * 201)
    assert fake.requests == []


def test_share_and_unshare_an_endpoint() -> None:
    fake = FakeBroker()
    client = fake.client()
    with pytest.warns(UserWarning, match="single-user endpoint") as warned:
        shared = client.share_endpoint("ep-1", "alice")
    assert shared["shared_with"] == ["alice"] and str(warned[0].message) == shared["warning"]
    with pytest.warns(UserWarning):
        assert client.share_endpoint("ep-1", "bob")["shared_with"] == ["alice", "bob"]
    assert client.unshare_endpoint("ep-1", "alice")["shared_with"] == ["bob"]
    assert client.get_endpoint_sharing("ep-1")["shared_with"] == ["bob"]
    assert client.leave_endpoint("ep-2") == {"endpoint_id": "ep-2", "left": True}
    assert client.leave_function("fn-1") == {"function_id": "fn-1", "left": True}
    assert fake.requests == [
        ("POST", "/endpoints/ep-1/share", {"username": "alice"}),
        ("POST", "/endpoints/ep-1/share", {"username": "bob"}),
        ("POST", "/endpoints/ep-1/unshare", {"username": "alice"}),
        ("GET", "/endpoints/ep-1/sharing", None),
        ("POST", "/endpoints/ep-2/leave", None),
        ("POST", "/functions/fn-1/leave", None),
    ]


def test_share_a_function_with_a_user_and_with_everyone() -> None:
    fake = FakeBroker()
    client = fake.client()
    assert client.share_function("fn-1", "alice") == {
        "function_id": "fn-1", "shared_with": ["alice"], "public": False}
    assert client.share_function("fn-1", public=True)["public"] is True
    assert client.unshare_function("fn-1", "alice") == {
        "function_id": "fn-1", "shared_with": [], "public": True}
    assert client.unshare_function("fn-1", public=True)["public"] is False
    assert client.share_function("fn-1", "bob", public=True) == {
        "function_id": "fn-1", "shared_with": ["bob"], "public": True}
    assert client.get_function_sharing("fn-1") == {
        "function_id": "fn-1", "shared_with": ["bob"], "public": True}
    assert fake.requests == [
        ("POST", "/functions/fn-1/share", {"username": "alice"}),
        ("POST", "/functions/fn-1/share", {"public": True}),
        ("POST", "/functions/fn-1/unshare", {"username": "alice"}),
        ("POST", "/functions/fn-1/unshare", {"public": True}),
        ("POST", "/functions/fn-1/share", {"username": "bob", "public": True}),
        ("GET", "/functions/fn-1/sharing", None),
    ]


@pytest.mark.parametrize("call, message", [
    (lambda c: c.share_function("fn-1"), "share_function: say whom with: username=.*public=True"),
    (lambda c: c.unshare_function("fn-1"), "unshare_function: say whom with: username=.*public=True"),
    (lambda c: c.share_function("fn-1", None, public=False), "say whom"),
    (lambda c: c.share_endpoint("ep-1", None), "share_endpoint: say whom with: username="),
    (lambda c: c.unshare_endpoint("ep-1", None), "unshare_endpoint: say whom"),
    (lambda c: c.share_endpoint("ep-1", "not a name!"), "username must be a user's name on the broker"),
    (lambda c: c.share_function("fn-1", "x" * 65), "at most 64 characters"),
    (lambda c: c.share_function("fn-1", 42), "username must be"),
    (lambda c: c.share_function("fn-1", public="yes"), "public must be True or False"),
])
def test_sharing_with_no_one_or_a_bad_name_is_a_value_error(call: Any, message: str) -> None:
    fake = FakeBroker()
    with pytest.raises(ValueError, match=message):
        call(fake.client())
    assert fake.requests == []


def test_sharing_someone_elses_object_is_permission_denied_at_once() -> None:
    fake = FakeBroker()
    fake.foreign = {"ep-theirs", "fn-theirs"}
    client = fake.client(retry_seconds=10)
    for call in (lambda: client.share_endpoint("ep-theirs", "alice"),
                 lambda: client.get_endpoint_sharing("ep-theirs"),
                 lambda: client.unshare_function("fn-theirs", public=True)):
        with pytest.raises(PermissionDenied, match="only the owner") as info:
            call()
        assert info.value.status == 403 and info.value.error == "forbidden"
    assert len(fake.requests) == 3  # a 403 is not retried


def test_a_403_quota_is_permission_denied_and_not_retried() -> None:
    fake = FakeBroker()
    fake.script("POST", "/functions", 403, {
        "error": "quota_exceeded",
        "message": "you hold 100 functions, the most allowed; delete some (Client.delete_function)"})
    client = fake.client(retry_seconds=10)
    with pytest.raises(PermissionDenied, match="delete some") as info:
        client.register_function_payload("payload", "f")
    assert info.value.error == "quota_exceeded"
    assert fake.calls("/functions") == [{"function": "payload", "function_name": "f", "description": ""}]


def test_sharing_with_an_unknown_user_is_not_found() -> None:
    with pytest.raises(NotFound, match="no user is named carol"):
        FakeBroker().client().share_endpoint("ep-1", "carol")


def test_broker_error_maps_403_and_404() -> None:
    denied = broker_error(403, "only the owner may", "forbidden", {"error": "forbidden"})
    assert isinstance(denied, PermissionDenied) and denied.status == 403
    assert isinstance(broker_error(404, "no such task"), NotFound)
