"""registration.py: endpoint.json keeps every registration with its broker's id; a start finds the
one for the configured broker whatever URL it is reached at, refuses a different broker unless
asked to register again, and never registers anew because a broker does not answer."""

from __future__ import annotations

import json
import logging
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from farcall.endpoint import registration
from farcall.endpoint.config import endpoint_dir
from farcall.endpoint.errors import EndpointConfigError, EndpointRejected, RegistrationError
from farcall.endpoint.registration import (
    BrokerUnreachable,
    Registration,
    confirm,
    ensure_registered,
    load_registration,
    load_registrations,
    refused,
    register_endpoint,
    save_registration,
)
from harness.procs import free_port
from tests.endpoint.helpers import ipv6_first
from tests.helpers import StubHTTP, serve_on_loopback


class StubBroker:
    """The two routes a start asks, on 127.0.0.1: ``GET /v1/health`` says ``broker_id`` (404 when
    it is None: a broker from before broker ids; 503 without it while ``down``), and
    ``POST /v1/endpoints`` registers ``ep-<broker>-<n>``. Records each request's method and path."""

    def __init__(self, broker_id: str | None) -> None:
        self.broker_id = broker_id
        self.down = False
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                stub.requests.append(("GET", self.path))
                if self.path != "/v1/health" or stub.broker_id is None:
                    self._reply(404, {"error": "not_found", "message": "no such route"})
                elif stub.down:
                    self._reply(503, {"status": "unavailable", "version": "t", "broker_id": ""})
                else:
                    self._reply(200, {"status": "ok", "version": "t", "broker_id": stub.broker_id})

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with stub._lock:
                    n = len(stub.registered)
                    stub.requests.append(("POST", self.path))
                eid = f"ep-{stub.broker_id}-{n}"
                self._reply(200, {"endpoint_id": eid, "name": "x", "credential": f"fce_{eid}",
                                  "broker_id": stub.broker_id or ""})

        self.server, self.url = serve_on_loopback(Handler)
        self.port = self.server.server_port

    @property
    def registered(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] == "POST"]

    @property
    def localhost_url(self) -> str:
        """The same server spelt another way (localhost resolves to 127.0.0.1 here)."""
        return f"http://localhost:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    monkeypatch.delenv("FARCALL_BROKER_URL", raising=False)
    monkeypatch.setenv("FARCALL_TOKEN", "fcu_token")
    return tmp_path


@pytest.fixture
def first() -> Iterator[StubBroker]:
    b = StubBroker("broker-1")
    yield b
    b.close()


@pytest.fixture
def second() -> Iterator[StubBroker]:
    b = StubBroker("broker-2")
    yield b
    b.close()


@pytest.fixture
def directory() -> Path:
    return endpoint_dir("laptop")


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# ------------------------------------------------------------------ the first start, the file


def test_first_start_registers_and_later_starts_reuse_it(first: StubBroker, directory: Path) -> None:
    made = ensure_registered(directory, first.url, "laptop")
    assert made == Registration("ep-broker-1-0", "fce_ep-broker-1-0", "laptop", first.url, "broker-1")
    assert stat.S_IMODE((directory / "endpoint.json").stat().st_mode) == 0o600
    assert ensure_registered(directory, first.url, "laptop") == made
    assert len(first.registered) == 1
    assert load_registration(directory) == made


def test_registration_refused_or_unreachable_is_clear(directory: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    broker = StubHTTP((401, {"error": "unauthorized", "message": "unknown token"}))
    try:
        with pytest.raises(RegistrationError, match="401.*unknown token.*FARCALL_TOKEN"):
            register_endpoint(broker.url, "bad", "x")
    finally:
        broker.close()
    monkeypatch.delenv("FARCALL_TOKEN")
    with pytest.raises(EndpointConfigError, match="FARCALL_TOKEN"):
        ensure_registered(directory, broker.url, "x")
    with pytest.raises(RegistrationError, match="cannot reach the broker"):
        register_endpoint(closed_url(), "t", "x", timeout=0.5)


def test_a_file_from_before_broker_ids_loads(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "endpoint.json").write_text(json.dumps({
        "endpoint_id": "ep-old", "credential": "fce_old", "name": "laptop",
        "broker_url": "http://127.0.0.1:8000"}))
    assert load_registration(directory) == Registration(
        "ep-old", "fce_old", "laptop", "http://127.0.0.1:8000", "")


@pytest.mark.parametrize("text", ["{not json", '{"registrations": [{"endpoint_id": 1}]}', "[]"])
def test_a_damaged_file_says_what_to_do(directory: Path, text: str) -> None:
    directory.mkdir(parents=True)
    (directory / "endpoint.json").write_text(text)
    with pytest.raises(RegistrationError, match="damaged.*restore it from a backup"):
        load_registration(directory)


def test_saving_keeps_every_other_registration(directory: Path) -> None:
    a = Registration("ep-a", "fce_a", "laptop", "http://a", "A")
    b = Registration("ep-b", "fce_b", "laptop", "http://b", "B")
    save_registration(directory, a)
    save_registration(directory, b)
    save_registration(directory, Registration("ep-a", "fce_a", "laptop", "http://a2", "A"))
    stored = load_registrations(directory)
    assert stored is not None and stored.endpoint_id == "ep-a"
    assert [r.broker_url for r in stored.registrations] == ["http://a2", "http://b"]


# ------------------------------------------------------------------ the same broker, another URL


def test_the_same_broker_under_another_url_is_the_same_endpoint(
    first: StubBroker, directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = ensure_registered(directory, first.url, "laptop")
    with caplog.at_level(logging.INFO, logger=registration.__name__):
        again = ensure_registered(directory, first.localhost_url, "laptop")
    assert again.endpoint_id == made.endpoint_id and again.credential == made.credential
    assert again.broker_url == first.localhost_url
    assert len(first.registered) == 1
    assert load_registration(directory) == again  # the stored URL follows
    assert f"now at {first.localhost_url} (was {first.url})" in caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_a_registration_without_broker_id_learns_it_at_its_stored_url(
    first: StubBroker, directory: Path
) -> None:
    directory.mkdir(parents=True)
    (directory / "endpoint.json").write_text(json.dumps({
        "endpoint_id": "ep-old", "credential": "fce_old", "name": "laptop",
        "broker_url": first.url}))
    found = ensure_registered(directory, first.localhost_url, "laptop")
    assert found == Registration("ep-old", "fce_old", "laptop", first.localhost_url, "broker-1")
    assert ("GET", "/v1/health") in first.requests and not first.registered
    raw = json.loads((directory / "endpoint.json").read_text())
    assert raw["endpoint_id"] == "ep-old" and raw["registrations"][0]["broker_id"] == "broker-1"


def test_a_credential_whose_broker_cannot_be_asked_is_tried_at_the_new_url(
    first: StubBroker, directory: Path
) -> None:
    old_url = closed_url()
    save_registration(directory, Registration("ep-old", "fce_old", "laptop", old_url))
    tried = ensure_registered(directory, first.url, "laptop")
    assert (tried.endpoint_id, tried.broker_url, tried.broker_id) == ("ep-old", first.url, "")
    assert not first.registered
    assert load_registration(directory) == Registration("ep-old", "fce_old", "laptop", old_url)
    # Should the broker refuse the credential, the error says how to register there.
    error = refused(directory, tried, EndpointRejected("refused (401)"))
    assert isinstance(error, RegistrationError)
    assert old_url in str(error) and "farcall-endpoint start laptop --register-again" in str(error)
    # The broker took the credential (its Welcome named it): same broker, new URL.
    confirmed = confirm(directory, tried, "broker-1")
    assert load_registration(directory) == confirmed == Registration(
        "ep-old", "fce_old", "laptop", first.url, "broker-1")
    known = refused(directory, confirmed, EndpointRejected("refused (401)"))
    assert isinstance(known, EndpointRejected)


# ------------------------------------------------------------------ a different broker


def test_a_different_broker_is_refused_until_registered_again(
    first: StubBroker, second: StubBroker, directory: Path
) -> None:
    one = ensure_registered(directory, first.url, "laptop")
    before = (directory / "endpoint.json").read_text()
    with pytest.raises(RegistrationError) as caught:
        ensure_registered(directory, second.url, "laptop")
    message = str(caught.value)
    for part in (first.url, "broker-1", second.url, "broker-2",
                 "farcall-endpoint start laptop --register-again", one.endpoint_id):
        assert part in message, (part, message)
    assert not second.registered and (directory / "endpoint.json").read_text() == before

    two = ensure_registered(directory, second.url, "laptop", register_again=True)
    assert (two.endpoint_id, two.broker_id) == ("ep-broker-2-0", "broker-2")
    assert load_registration(directory) == two
    stored = load_registrations(directory)
    assert stored is not None and [r.endpoint_id for r in stored.registrations] == [
        one.endpoint_id, two.endpoint_id]

    # Back to the first broker (under another spelling, even): the first endpoint, no flag.
    back = ensure_registered(directory, first.localhost_url, "laptop")
    assert back.endpoint_id == one.endpoint_id and load_registration(directory) == back
    # And to the second again: its credential is in the file, no flag needed.
    assert ensure_registered(directory, second.url, "laptop").endpoint_id == two.endpoint_id
    assert len(first.registered) == len(second.registered) == 1


def test_a_broker_that_says_no_id_is_matched_by_url(directory: Path) -> None:
    old = StubBroker(None)  # GET /v1/health: 404
    try:
        made = ensure_registered(directory, old.url, "laptop")
        assert made.broker_id == "" and len(old.registered) == 1
        assert ensure_registered(directory, old.url, "laptop") == made
        with pytest.raises(RegistrationError, match="--register-again"):
            ensure_registered(directory, old.localhost_url, "laptop")
        assert len(old.registered) == 1
    finally:
        old.close()


# ------------------------------------------------------------------ a broker that does not answer


def test_an_unreachable_broker_starts_with_the_registration_for_its_url(
    first: StubBroker, directory: Path
) -> None:
    made = ensure_registered(directory, first.url, "laptop")
    first.down = True  # answers 503 without an id: as good as down
    assert ensure_registered(directory, first.url, "laptop") == made
    first.close()
    assert ensure_registered(directory, first.url, "laptop") == made
    assert len(first.registered) == 1


def test_an_unreachable_broker_under_a_new_url_is_not_registered_with_blindly(
    first: StubBroker, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_registered(directory, first.url, "laptop")
    monkeypatch.setattr(registration, "IDENTITY_WAIT", 0.3)
    gone = closed_url()
    with pytest.raises(BrokerUnreachable, match=f"{gone} does not answer.*Start again"):
        ensure_registered(directory, gone, "laptop")
    stored = load_registrations(directory)
    assert stored is not None and len(stored.registrations) == 1


def test_a_broker_names_itself_during_an_outage_once_it_knows(directory: Path) -> None:
    reply = {"status": "unavailable", "version": "t", "broker_id": "broker-1", "services": {}}
    stub = StubHTTP((503, reply))
    try:
        assert registration.broker_identity(stub.url) == "broker-1"
    finally:
        stub.close()


def test_localhost_resolving_to_ipv6_first_still_reaches_a_broker_on_127_0_0_1(
    first: StubBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    ipv6_first(monkeypatch)
    assert registration.broker_identity(first.localhost_url) == "broker-1"
