"""Issue 19: an endpoint keeps its identity, on real broker and endpoint processes with Redis and
RabbitMQ. The same broker reached under another URL (``localhost`` for ``127.0.0.1``) is the same
endpoint, so tasks queued while it was stopped run; a different broker (a second deployment,
another Redis prefix) is refused with a clear error until the operator registers again, and
switching back reconnects as the first endpoint.

Functions are defined inside the tests so they travel by value (workers cannot import this module).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from farcall import Client, Executor
from farcall.endpoint.registration import Registration, load_registration, load_registrations
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint, own_broker

pytestmark = pytest.mark.integration

DEADLINE = 60.0


def broker_id(broker: Broker) -> str:
    found = httpx.get(f"{broker.url}/v1/health", timeout=10).json()["broker_id"]
    assert found
    return str(found)


def set_broker_url(ep: Endpoint, url: str) -> None:
    path = ep.dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["broker_url"] = url
    path.write_text(yaml.safe_dump(config))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_the_same_broker_under_another_url_is_the_same_endpoint(
    broker: Broker, make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    """The probe of issue 19: tasks queued for the endpoint ran once it came back under
    ``http://localhost:P`` (before, it registered as a new endpoint and they waited for ever).
    Its ``endpoint.json`` is as an endpoint of the previous release wrote it (one registration,
    no broker id): the start learns the broker's id by asking it at the stored URL."""
    name = unique("ident")
    ep = make_endpoint(name, workers=2)
    first = ep.start(client)
    ep.stop()
    stored = load_registration(ep.dir)
    assert stored is not None and stored.broker_id == broker_id(broker)
    (ep.dir / "endpoint.json").write_text(json.dumps({
        "endpoint_id": stored.endpoint_id, "credential": stored.credential, "name": stored.name,
        "broker_url": stored.broker_url}))

    def square(x: int) -> int:
        return x * x

    localhost = broker.url.replace("127.0.0.1", "localhost")
    assert localhost != broker.url
    with Executor(endpoint_id=first, client=client) as ex:
        futures = [ex.submit(square, i) for i in range(5)]
        wait_until(lambda: all(f.task_id for f in futures), DEADLINE, "the tasks to be submitted")
        assert {client.get_task(str(f.task_id))["state"] for f in futures} == {"waiting-for-endpoint"}
        set_broker_url(ep, localhost)
        ep.spawn()
        assert [f.result(DEADLINE) for f in futures] == [0, 1, 4, 9, 16]
    assert {client.get_task(str(f.task_id))["endpoint_id"] for f in futures} == {first}
    assert [e["endpoint_id"] for e in client.get_endpoints() if e["name"] == name] == [first]
    assert load_registration(ep.dir) == Registration(
        first, stored.credential, stored.name, localhost, broker_id(broker))
    proc = ep.proc
    assert proc is not None
    wait_until(lambda: f"is now at {localhost} (was {broker.url})" in proc.output(),
               DEADLINE, "the endpoint to log that the broker's URL changed")
    warnings = [line for line in proc.output().splitlines() if " WARNING " in line]
    assert all("FARCALL_TOKEN is set in the agent's environment: it is not needed once" in line
               for line in warnings), warnings  # the test starts it with the owner's token set


def test_a_different_broker_is_refused_until_registered_again(
    broker: Broker, service_env: dict[str, str], make_endpoint: Callable[..., Endpoint],
    client: Client, tmp_path: Path,
) -> None:
    def triple(x: int) -> int:
        return 3 * x

    name = unique("ident")
    ep = make_endpoint(name, workers=1)
    first = ep.start(client)
    ep.stop()
    with own_broker(service_env, tmp_path, "second") as other:
        token = other.create_user(unique("bob"))
        set_broker_url(ep, other.url)
        refused = ep.cli("start", name)
        assert refused.returncode == 1, refused
        for part in (broker.url, broker_id(broker), other.url, broker_id(other), first,
                     f"farcall-endpoint start {name} --register-again"):
            assert part in refused.stderr, (part, refused.stderr)

        ep.env["FARCALL_TOKEN"] = token  # registering with the second broker takes its user's token
        try:
            started = ep.cli("start", name, "--detach", "--register-again")
            assert started.returncode == 0 and f"started endpoint {name} (" in started.stdout, started
            second = load_registration(ep.dir)
            assert second is not None and second.endpoint_id != first
            assert (second.broker_url, second.broker_id) == (other.url, broker_id(other))
            assert second.endpoint_id in ep.cli("list").stdout
            with Client(broker_url=other.url, token=token) as theirs, \
                    Executor(endpoint_id=second.endpoint_id, client=theirs) as ex:
                assert ex.submit(triple, 3).result(DEADLINE) == 9
        finally:
            stopped = ep.cli("stop", name)
        assert stopped.returncode == 0, stopped

        # Back to the first broker: the first endpoint again, without a flag or a token.
        set_broker_url(ep, broker.url)
        del ep.env["FARCALL_TOKEN"]
        ep.spawn()
        wait_until(lambda: client.get_endpoint_status(first)["status"] == "online", DEADLINE,
                   "the first endpoint to be online again")
        with Executor(endpoint_id=first, client=client) as ex:
            assert ex.submit(triple, 5).result(DEADLINE) == 15
        in_use = load_registration(ep.dir)
        assert in_use is not None and in_use.endpoint_id == first
        assert first in ep.cli("list").stdout
        stored = load_registrations(ep.dir)
        assert stored is not None
        assert [(r.endpoint_id, r.broker_id) for r in stored.registrations] == [
            (first, broker_id(broker)), (second.endpoint_id, broker_id(other))]
        assert [e["endpoint_id"] for e in client.get_endpoints() if e["name"] == name] == [first]
        ep.stop()
