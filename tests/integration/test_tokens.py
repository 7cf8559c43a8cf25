"""Tokens a user can manage: several per user, listed, revoked through the CLI, REST and the SDK.

Revocation is checked where it matters: on two broker processes sharing one
Redis, a revoked token is refused within a second on both, an open result
stream that authenticated with it is closed, and it can no longer submit.
"""

from __future__ import annotations

import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from farcall import Client
from farcall.errors import AuthenticationError
from harness.procs import wait_until
from tests.integration.helpers import Broker

REVOKED_WITHIN = 1.5
"""The promise is a second; the margin covers a loaded CI machine's scheduling."""


def _refused_everywhere(brokers: list[Broker], token: str) -> None:
    """Wait (at most ``REVOKED_WITHIN`` s) until every broker answers 401 to ``token``."""
    wait_until(lambda: all(b.status_of(token) == 401 for b in brokers), REVOKED_WITHIN,
               "the revoked token to be refused by every broker")


def test_cli_gives_lists_and_revokes_tokens(broker: Broker, second_broker: Broker) -> None:
    name = f"carol-{uuid.uuid4().hex[:6]}"
    first = broker.create_user(name)
    done = broker.cli("users", "token", name, "--token-name", "laptop")
    assert done.returncode == 0, done.stderr
    second = done.stdout.strip().splitlines()[-1]
    assert second.startswith("fcu_") and second != first
    assert broker.status_of(second) == 200

    listed = broker.cli("tokens", "list", "--user", name)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert len(rows) == 2 and all(row[1] == name for row in rows)
    assert first not in listed.stdout and second not in listed.stdout  # ids, never the tokens
    laptop = next(row[0] for row in rows if row[-1] == "laptop")

    assert second_broker.status_of(second) == 200  # cached on the other replica too
    revoked = broker.cli("tokens", "revoke", laptop)
    assert revoked.returncode == 0, revoked.stderr
    _refused_everywhere([broker, second_broker], second)
    assert broker.status_of(first) == 200  # the user's other token still works

    again = broker.cli("tokens", "revoke", laptop)
    assert again.returncode == 1 and "no token" in again.stderr
    unknown = broker.cli("users", "token", f"nobody-{uuid.uuid4().hex[:6]}")
    assert unknown.returncode == 1 and "no user named" in unknown.stderr
    taken = broker.cli("users", "create", name)
    assert taken.returncode == 1 and "already exists" in taken.stderr


def test_revoking_closes_open_streams_and_stops_submissions(
    broker: Broker, second_broker: Broker, token: str
) -> None:
    """A token made and revoked through the SDK: refused within a second on both replicas, its
    result stream on the other replica closed (4001), its submissions refused."""
    with Client(broker_url=broker.url, token=token) as owner:
        made = owner.create_token("notebook")
        assert set(made) >= {"token_id", "token", "name", "created_at"}
        assert made["name"] == "notebook"
        listed = {t["token_id"]: t for t in owner.list_tokens()}
        assert made["token_id"] in listed and "token" not in listed[made["token_id"]]
        endpoint_id = owner.register_endpoint("revocation-test")["endpoint_id"]
        function_id = owner.register_function(abs)

    notebook = Client(broker_url=second_broker.url, token=made["token"], retry_seconds=0)
    group = notebook.create_task_group()
    url = notebook.websocket_url(f"/task_groups/{group}/results")
    with connect(url, additional_headers={"Authorization": f"Bearer {made['token']}"}) as stream:
        with Client(broker_url=broker.url, token=token) as owner:
            answer = owner.revoke_token(made["token_id"])
            assert answer == {"token_id": made["token_id"], "revoked": True}
            assert made["token_id"] not in {t["token_id"] for t in owner.list_tokens()}
        with pytest.raises(ConnectionClosed) as closed:
            stream.recv(timeout=REVOKED_WITHIN)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001

    _refused_everywhere([broker, second_broker], made["token"])
    with pytest.raises(AuthenticationError):
        notebook.run(1, endpoint_id=endpoint_id, function_id=function_id)
    notebook.close()
    with Client(broker_url=broker.url, token=token) as owner:
        # A user can revoke only their own tokens; the answer does not tell whose another is.
        other = owner.create_token()
        name = f"dave-{uuid.uuid4().hex[:6]}"
        with Client(broker_url=broker.url, token=broker.create_user(name)) as dave:
            with pytest.raises(Exception, match="404"):
                dave.revoke_token(other["token_id"])
        assert broker.status_of(other["token"]) == 200
        owner.delete_endpoint(endpoint_id)


def test_a_deleted_endpoint_credential_is_refused_at_once(broker: Broker, token: str) -> None:
    """Endpoint credentials are not cached: deleting the endpoint stops its next connect."""
    with Client(broker_url=broker.url, token=token) as owner:
        registered = owner.register_endpoint("deleted-credential")
        url = owner.websocket_url(f"/endpoints/{registered['endpoint_id']}/connect")
        headers = {"Authorization": f"Bearer {registered['credential']}"}
        with connect(url, additional_headers=headers):
            pass  # accepted while the endpoint exists
        owner.delete_endpoint(registered["endpoint_id"])
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401
