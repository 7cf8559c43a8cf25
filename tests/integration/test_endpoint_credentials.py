"""Issue 20: an endpoint's credential can be rotated without deleting the endpoint, on broker and
endpoint processes with Redis and RabbitMQ.

The attack it answers: a task on a shared endpoint read the endpoint's credential and connected
as the endpoint, so it received the next users' tasks. After the owner rotates the credential,
that forged session ends at once on whichever replica holds it (close code 4005), the old
credential is refused everywhere, and the owner's agent reconnects with the new one that
``farcall-endpoint rotate-credential`` stored, so its tasks run on.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from farcall import Client, Executor
from farcall.endpoint.registration import load_registration
from farcall.errors import NotFound, PermissionDenied
from farcall.protocol.channel import Heartbeat, Hello, Welcome
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration

ROTATED = 4005
ENDED_WITHIN = 1.5
"""The promise is "at once"; the margin covers a loaded CI machine's scheduling."""


@contextmanager
def _session(broker: Broker, endpoint_id: str, credential: str) -> Iterator[ClientConnection]:
    """An endpoint session opened by hand with ``credential`` (as a stolen one would be): hello
    sent, welcome read."""
    url = Client(broker_url=broker.url, token="unused").websocket_url(
        f"/endpoints/{endpoint_id}/connect")
    with connect(url, additional_headers={"Authorization": f"Bearer {credential}"}) as ws:
        ws.send(Hello(credit=0, heartbeat=Heartbeat()).model_dump_json())
        assert Welcome.model_validate_json(ws.recv(timeout=10)).endpoint_id == endpoint_id
        yield ws


def _refused(broker: Broker, endpoint_id: str, credential: str) -> int:
    url = Client(broker_url=broker.url, token="unused").websocket_url(
        f"/endpoints/{endpoint_id}/connect")
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, additional_headers={"Authorization": f"Bearer {credential}"}):
            pass
    return refused.value.response.status_code


def test_a_rotated_credential_ends_its_sessions_and_is_refused_on_every_replica(
    broker: Broker, second_broker: Broker, client: Client
) -> None:
    registered = client.register_endpoint(f"rotated-{uuid.uuid4().hex[:6]}")
    endpoint_id, stolen = registered["endpoint_id"], registered["credential"]
    with _session(second_broker, endpoint_id, stolen) as forged:  # on the other replica
        fresh = client.rotate_endpoint_credential(endpoint_id)
        with pytest.raises(ConnectionClosed) as closed:
            forged.recv(timeout=ENDED_WITHIN)
    assert fresh.startswith("fce_") and fresh != stolen
    assert closed.value.rcvd is not None and closed.value.rcvd.code == ROTATED
    assert "rotated" in closed.value.rcvd.reason
    assert [_refused(b, endpoint_id, stolen) for b in (broker, second_broker)] == [401, 401]
    with _session(second_broker, endpoint_id, fresh):
        pass  # the new credential connects
    client.delete_endpoint(endpoint_id)


def test_only_the_owner_rotates_a_credential(broker: Broker, client: Client) -> None:
    registered = client.register_endpoint(f"owned-{uuid.uuid4().hex[:6]}")
    endpoint_id = registered["endpoint_id"]
    name = f"colleague-{uuid.uuid4().hex[:6]}"
    with Client(broker_url=broker.url, token=broker.create_user(name)) as colleague:
        with pytest.raises(NotFound):
            colleague.rotate_endpoint_credential(endpoint_id)
        with pytest.warns(UserWarning, match="single-user endpoint"):
            client.share_endpoint(endpoint_id, name)
        with pytest.raises(PermissionDenied, match="only its owner"):
            colleague.rotate_endpoint_credential(endpoint_id)
    with _session(broker, endpoint_id, registered["credential"]):
        pass  # still the endpoint's credential
    client.delete_endpoint(endpoint_id)


def test_the_cli_rotates_and_the_running_agent_reconnects_with_the_new_credential(
    broker: Broker, make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    ep = make_endpoint(f"rotate-{uuid.uuid4().hex[:6]}", workers=1)
    endpoint_id = ep.start(client)
    before = load_registration(ep.dir)
    assert before is not None

    done = ep.cli("rotate-credential", ep.name)

    assert done.returncode == 0, done.stderr
    assert "new credential" in done.stdout and "reconnects" in done.stdout
    after = load_registration(ep.dir)
    assert after is not None and after.endpoint_id == endpoint_id
    assert after.credential != before.credential
    assert (ep.dir / "endpoint.json").stat().st_mode & 0o777 == 0o600
    assert _refused(broker, endpoint_id, before.credential) == 401

    def double(x: int) -> int:
        return 2 * x

    with Executor(endpoint_id=endpoint_id, client=client) as ex:
        assert ex.submit(double, 21).result(60) == 42
    log = ep.home / f"{ep.name}.log"
    wait_until(lambda: "reconnecting with the endpoint's new credential" in log.read_text(), 10,
               "the agent to say it took up the new credential")
