"""HTTPS and WSS end to end: ``farcall-broker serve --ssl-certfile/--ssl-keyfile`` with a CA made here.

With ``FARCALL_CA_BUNDLE`` naming that CA, an endpoint process connects over wss
and a task submitted over https runs; without it the SDK and the agent stop at
once with :class:`~farcall.errors.CertificateError` instead of retrying.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from farcall import Client, Executor
from farcall.errors import CertificateError
from harness.deploy import BrokerProcess, EndpointProcess
from harness.procs import wait_until
from harness.tls import TestCA
from tests.integration.helpers import own_broker

pytestmark = pytest.mark.integration

FAST = 5.0
"""A certificate failure is reported within this many seconds (the SDK retries outages for 30 s)."""
AGENT_EXIT = 15.0
"""An agent that cannot trust the broker exits within this (its own start-up included)."""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tls_broker(
    service_env: dict[str, str], ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """A broker serving HTTPS/WSS for 127.0.0.1 and localhost, with prefixes of its own."""
    cert = ca.issue(["127.0.0.1", "localhost"])
    with own_broker(service_env, tmp_path_factory.mktemp("tls-broker"), "tls",
                    certfile=cert.certfile, keyfile=cert.keyfile, ca_file=ca.ca_file) as broker:
        yield broker


@pytest.fixture(scope="module")
def tls_token(tls_broker: BrokerProcess) -> str:
    return tls_broker.create_user(f"tls-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def trusting(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process trusts the test CA through FARCALL_CA_BUNDLE."""
    monkeypatch.setenv("FARCALL_CA_BUNDLE", str(ca.ca_file))


@pytest.fixture
def make_endpoint(
    tls_broker: BrokerProcess, tls_token: str, ca: TestCA, tmp_path: Path
) -> Iterator[EndpointProcess]:
    """A thread-pool endpoint configured for the TLS broker, trusting the test CA."""
    env = dict(tls_broker.env, FARCALL_HOME=str(tmp_path / "home"),
               FARCALL_BROKER_URL=tls_broker.url, FARCALL_TOKEN=tls_token,
               FARCALL_CA_BUNDLE=str(ca.ca_file))
    ep = EndpointProcess("tls-ep", env).configure("ThreadPoolEngine", 2, tls_broker.url)
    yield ep
    ep.stop()


def _exits_with_certificate_error(ep: EndpointProcess) -> str:
    """Start ``ep`` and wait for it to exit on its own; what it logged, checked for the clear error."""
    log_path = ep.home / f"{ep.name}.log"
    before = log_path.stat().st_size if log_path.exists() else 0
    ep.spawn()
    proc = ep.proc
    assert proc is not None and proc.popen is not None
    wait_until(lambda: not proc.alive(), AGENT_EXIT,
               f"the endpoint to exit on the untrusted certificate\n{proc.output(4000)}")
    output = proc.output()[before:]
    assert proc.popen.returncode == 1, output
    assert "is not trusted" in output and "FARCALL_CA_BUNDLE" in output, output
    assert "reconnecting in" not in output and "retrying" not in output, output
    return output


def test_endpoint_and_executor_over_tls(
    tls_broker: BrokerProcess, tls_token: str, make_endpoint: EndpointProcess, trusting: None
) -> None:
    assert tls_broker.url.startswith("https://")
    with Client(broker_url=tls_broker.url, token=tls_token) as client:
        make_endpoint.spawn()
        endpoint_id = make_endpoint.wait_online(client)
        proc = make_endpoint.proc
        assert proc is not None
        # online at its hello; the agent logs the connection once the welcome is in
        wait_until(lambda: f"connected to {tls_broker.url}" in proc.output(), 30,
                   f"the agent to log its connection\n{proc.output(4000)}")

        def triple(x: int) -> int:
            return 3 * x

        with Executor(endpoint_id=endpoint_id, client=client) as ex:
            assert ex.submit(triple, 14).result(timeout=60) == 42
            big = b"t" * (3 << 20)  # the data plane: the worker's own https trusts the CA too
            assert ex.submit(triple, big).result(timeout=60) == big * 3
        assert client.get_endpoint_status(endpoint_id)["status"] == "online"


def test_sdk_without_the_ca_fails_at_once(
    tls_broker: BrokerProcess, tls_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FARCALL_CA_BUNDLE", raising=False)
    started = time.monotonic()
    with Client(broker_url=tls_broker.url, token=tls_token) as client:
        with pytest.raises(CertificateError, match="FARCALL_CA_BUNDLE") as caught:
            client.get_endpoints()
    assert time.monotonic() - started < FAST
    assert "is not trusted" in str(caught.value)
    assert "unable to get local issuer certificate" in str(caught.value)


def test_agent_without_the_ca_exits_instead_of_retrying(
    tls_broker: BrokerProcess, tls_token: str, make_endpoint: EndpointProcess, ca: TestCA,
    trusting: None,
) -> None:
    ep = make_endpoint
    del ep.env["FARCALL_CA_BUNDLE"]
    output = _exits_with_certificate_error(ep)  # the first start registers, over https
    assert not (ep.dir / "endpoint.json").exists(), output
    assert "starting endpoint" not in output, output

    ep.env["FARCALL_CA_BUNDLE"] = str(ca.ca_file)
    with Client(broker_url=tls_broker.url, token=tls_token) as client:
        ep.spawn()
        ep.wait_online(client)
    ep.stop()

    del ep.env["FARCALL_CA_BUNDLE"]  # registered now: asking the broker who it is refuses
    before = (ep.dir / "endpoint.json").read_text()
    output = _exits_with_certificate_error(ep)
    assert (ep.dir / "endpoint.json").read_text() == before, "the registration is kept"
