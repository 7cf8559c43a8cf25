"""``farcall.broker.deps``: the user a token names (every user route refuses a missing, unknown
or endpoint credential) and the error answers routes document."""

from __future__ import annotations

from farcall.broker import deps
from farcall.broker.settings import Settings
from farcall.protocol.rest import ErrorBody
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api


def test_error_answers_name_the_error_body_and_why() -> None:
    answers = deps.error_answers(404, 429)
    assert set(answers) == {404, 429}
    assert all(a["model"] is ErrorBody for a in answers.values())
    assert "not yours" in answers[404]["description"]
    assert "Retry-After" in answers[429]["headers"] and "headers" not in answers[404]
    assert set(deps.ANY_ERRORS) == {400, 413}
    assert set(deps.OBJECT_ERRORS) == set(deps.USER_ERRORS) | {404}


def test_every_route_needs_a_token(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    checked = 0
    for path, methods in paths.items():
        if path == "/v1/health":
            continue
        url = path.replace("{", "").replace("}", "")
        for method in methods:
            r = api.client.request(method.upper(), url, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
            bad = api.client.request(
                method.upper(), url, headers={"Authorization": "Bearer fcu_nope"}
            )
            assert bad.status_code == 401
            checked += 1
    assert checked >= 13


def test_endpoint_credential_is_forbidden_on_user_routes(api: Api) -> None:
    ep = api.endpoint(api.user("alice"))
    r = api.client.get("/v1/endpoints", headers={"Authorization": f"Bearer {ep['credential']}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_each_request_counts_against_its_tokens_rate_limit(make_api: MakeApi) -> None:
    api = make_api(Settings(auth_failure_rate=0, rate_limit=0.01, rate_burst=2))
    alice = api.user("alice")
    assert [api.client.get("/v1/whoami", headers=alice).status_code for _ in range(3)] == [
        200, 200, 429]
    assert api.client.get("/v1/whoami", headers=api.user("bob")).status_code == 200
