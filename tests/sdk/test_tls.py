"""farcall.tls: how the SDK, its result stream and the agent trust a broker, and when they warn.

Servers here are in-process TLS servers on loopback with a throwaway CA
(harness/tls.py); the real broker over HTTPS/WSS is in tests/integration/test_tls.py.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection, serve

from farcall import Client, tls
from farcall.endpoint.agent import Agent
from farcall.endpoint.engines.threads import ThreadPoolEngine
from farcall.errors import CertificateError, ConfigurationError, FarcallError
from farcall.stream import TaskGroupStream
from farcall.transport import Transport, TransportError
from harness.tls import ServerCertificate, TestCA

FAST = 3.0
"""A certificate failure is reported within this many seconds (the retry budget is 30 s)."""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_cert(ca: TestCA) -> ServerCertificate:
    return ca.issue(["localhost", "127.0.0.1"])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CA bundle unless a test sets one, and every host unwarned."""
    monkeypatch.delenv(tls.CA_BUNDLE_VARIABLE, raising=False)
    monkeypatch.setattr(tls, "_warned", set())


def _server_context(cert: ServerCertificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.certfile, cert.keyfile)
    return context


class _Endpoints(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = json.dumps({"endpoints": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
        pass


@pytest.fixture
def https_url(server_cert: ServerCertificate) -> Iterator[str]:
    """An HTTPS server on loopback answering every GET with ``{"endpoints": []}``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoints)
    server.socket = _server_context(server_cert).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def wss_port(server_cert: ServerCertificate) -> Iterator[int]:
    """A WSS server on loopback that greets and closes."""

    def greet(ws: ServerConnection) -> None:
        ws.send("hello")

    with serve(greet, "127.0.0.1", 0, ssl=_server_context(server_cert)) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield int(server.socket.getsockname()[1])
        server.shutdown()


def _check_certificate_message(error: BaseException) -> None:
    text = str(error)
    assert "certificate" in text and "is not trusted" in text, text
    assert "FARCALL_CA_BUNDLE" in text and "SSL_CERT_FILE" in text, text


# ------------------------------------------------------------------ building the context


def test_context_verifies_by_default() -> None:
    context = tls.client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_ca_bundle_is_read_when_the_context_is_built(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    def subjects(context: ssl.SSLContext) -> list[object]:
        return [cert["subject"] for cert in context.get_ca_certs()]

    ca_subject = ((("commonName", "farcall test CA"),),)
    assert ca_subject not in subjects(tls.client_context())
    monkeypatch.setenv(tls.CA_BUNDLE_VARIABLE, str(ca.ca_file))
    with_bundle = tls.client_context()
    assert ca_subject in subjects(with_bundle)
    assert with_bundle.verify_mode == ssl.CERT_REQUIRED
    assert tls.client_context() is with_bundle  # cached by the path


@pytest.mark.parametrize("content", [None, "not a certificate\n", "dir"])
def test_a_bad_ca_bundle_is_a_clear_error(
    content: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bundle.pem"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    monkeypatch.setenv(tls.CA_BUNDLE_VARIABLE, str(path))
    with pytest.raises(ConfigurationError, match="FARCALL_CA_BUNDLE") as caught:
        tls.client_context()
    assert str(path) in str(caught.value)
    with pytest.raises(ConfigurationError, match="FARCALL_CA_BUNDLE"):
        Client(broker_url="https://broker.example.org", token="t")


# ------------------------------------------------------------------ trusting a broker


def test_untrusted_certificate_fails_at_once(https_url: str) -> None:
    transport = Transport(https_url + "/v1", {})
    with pytest.raises(CertificateError) as caught:
        transport.request("GET", "/endpoints")
    assert not isinstance(caught.value, TransportError)
    _check_certificate_message(caught.value)
    assert "unable to get local issuer certificate" in str(caught.value)

    client = Client(broker_url=https_url, token="t")  # retries unreachable brokers for 30 s
    started = time.monotonic()
    with pytest.raises(CertificateError):
        client.get_endpoints()
    assert time.monotonic() - started < FAST


def test_ca_bundle_makes_the_broker_trusted(
    https_url: str, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tls.CA_BUNDLE_VARIABLE, str(ca.ca_file))
    with Client(broker_url=https_url, token="t") as client:
        assert client.get_endpoints() == []


def test_ssl_cert_file_keeps_working(
    https_url: str, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    with Client(broker_url=https_url, token="t") as client:
        assert client.get_endpoints() == []


def test_host_name_mismatch_fails_at_once(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    cert = ca.issue(["broker.example.org"], stem="other")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoints)
    server.socket = _server_context(cert).wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(tls.CA_BUNDLE_VARIABLE, str(ca.ca_file))
    try:
        with Client(broker_url=f"https://127.0.0.1:{server.server_address[1]}", token="t") as c:
            with pytest.raises(CertificateError, match="mismatch") as caught:
                c.get_endpoints()
        _check_certificate_message(caught.value)
    finally:
        server.shutdown()
        server.server_close()


def test_result_stream_reports_an_untrusted_certificate(wss_port: int) -> None:
    refused: list[FarcallError] = []
    ended = threading.Event()

    def on_refused(error: FarcallError) -> None:
        refused.append(error)
        ended.set()

    client = Client(broker_url=f"https://127.0.0.1:{wss_port}", token="t")
    stream = TaskGroupStream(client, "group", on_results=lambda results: None, poll=lambda: None,
                             on_refused=on_refused, done=lambda: False)
    stream.start()
    try:
        assert ended.wait(FAST), "the stream did not report the certificate failure"
        assert len(refused) == 1 and isinstance(refused[0], CertificateError)
        _check_certificate_message(refused[0])
        stream._thread.join(FAST)
        assert not stream._thread.is_alive(), "the stream kept retrying"
    finally:
        stream.close()


def test_result_stream_connects_with_the_ca_bundle(
    wss_port: int, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tls.CA_BUNDLE_VARIABLE, str(ca.ca_file))
    client = Client(broker_url=f"https://127.0.0.1:{wss_port}", token="t")
    stream = TaskGroupStream(client, "group", on_results=lambda results: None, poll=lambda: None,
                             on_refused=lambda error: None, done=lambda: False)
    stream.start()
    try:
        assert stream.wait_connected(FAST)
    finally:
        stream.close()


def test_agent_stops_on_an_untrusted_certificate(wss_port: int) -> None:
    agent = Agent(f"https://127.0.0.1:{wss_port}", "ep", "credential", ThreadPoolEngine(1))
    started = time.monotonic()
    with pytest.raises(CertificateError) as caught:
        asyncio.run(asyncio.wait_for(agent.run(), 10 * FAST))
    assert time.monotonic() - started < FAST + 2  # the engine's start and stop take a moment
    _check_certificate_message(caught.value)


# ------------------------------------------------------------------ plain http warnings


def test_token_over_plain_http_warns_once_per_host() -> None:
    with pytest.warns(tls.InsecureBrokerWarning, match="unencrypted") as caught:
        Client(broker_url="http://broker.example.org:8000", token="t")
    assert len(caught) == 1
    assert "broker.example.org" in str(caught[0].message) and "https://" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client(broker_url="http://broker.example.org:8000", token="t")  # the same host: quiet
    with pytest.warns(tls.InsecureBrokerWarning):
        Client(broker_url="http://10.1.2.3:8000", token="t")  # another host warns again


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000", "http://127.5.6.7", "http://localhost:8000", "http://[::1]:8000",
    "https://broker.example.org",
])
def test_loopback_and_https_are_quiet(url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client(broker_url=url, token="t").close()


def test_no_credential_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Transport("http://broker.example.org/v1", {"Accept": "application/json"})


def test_result_stream_and_agent_warn_for_plain_ws(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.warns(tls.InsecureBrokerWarning):
        client = Client(broker_url="http://far.example.org", token="t")
    monkeypatch.setattr(tls, "_warned", set())  # as if the stream were the first to reach it
    with pytest.warns(tls.InsecureBrokerWarning, match="ws://"):
        TaskGroupStream(client, "group", on_results=lambda results: None, poll=lambda: None,
                        on_refused=lambda error: None, done=lambda: True)
    with pytest.warns(tls.InsecureBrokerWarning, match="ws://"):
        Agent("http://agent.example.org", "ep", "credential", ThreadPoolEngine(1))
    client.close()
