"""``farcall.transport`` through a real forwarding proxy on loopback: credentials, tunnels, NO_PROXY.

The proxy here is written for the test (``CONNECT`` tunnels and absolute-form
requests, Basic credentials checked); the brokers behind it are tiny HTTP and
HTTPS servers, the HTTPS one with a throwaway CA (harness/tls.py).
"""

from __future__ import annotations

import base64
import http.client
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from farcall import Client, tls
from farcall.errors import ConfigurationError
from farcall.transport import Transport, TransportError, _proxy_for
from harness.tls import TestCA
from tests.helpers import StubHTTP

PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")

HOP_BY_HOP = {"connection", "content-length", "date", "keep-alive", "proxy-authorization",
              "proxy-connection", "server", "transfer-encoding"}


@dataclass
class Proxy:
    """What the proxy saw: ``(method, target, Proxy-Authorization)`` per request, connections."""

    port: int
    server: ThreadingHTTPServer
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    connections: int = 0


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (or 30 s of silence)."""
    try:
        while True:
            readable, _, _ = select.select([a, b], [], [], 30)
            if not readable:
                return
            for s in readable:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    finally:
        b.close()


def start_proxy(credentials: str | None) -> Proxy:
    """A proxy on 127.0.0.1 that answers 407 unless ``credentials`` (``user:password``) come with
    each request (or with the ``CONNECT``); ``None`` asks for none."""
    expected = None if credentials is None else basic(credentials)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            proxy.connections += 1

        def log_message(self, *args: Any) -> None:
            pass

        def _allowed(self) -> bool:
            got = self.headers.get("Proxy-Authorization")
            proxy.seen.append((self.command, self.path, got))
            if expected is None or got == expected:
                return True
            self.send_response(407)
            self.send_header("Proxy-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def do_CONNECT(self) -> None:  # noqa: N802 - the http.server API
            if not self._allowed():
                return
            host, port = self.path.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            self.send_response(200)
            self.end_headers()
            _pipe(self.connection, upstream)
            self.close_connection = True

        def _forward(self) -> None:
            if not self._allowed():
                return
            url = urlsplit(self.path)
            assert url.scheme == "http" and url.hostname, f"not an absolute http URL: {self.path}"
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
            try:
                upstream.request(self.command, url.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy = Proxy(server.server_address[1], server)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return proxy


@pytest.fixture(autouse=True)
def no_proxy_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy, exemption or CA bundle but what a test sets."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv(tls.CA_BUNDLE_VARIABLE, raising=False)


@pytest.fixture
def proxy_with() -> Iterator[Callable[[str | None], Proxy]]:
    """Starts proxies (``start_proxy``), stopped after the test."""
    started: list[Proxy] = []

    def start(credentials: str | None) -> Proxy:
        started.append(start_proxy(credentials))
        return started[-1]

    yield start
    for proxy in started:
        proxy.server.shutdown()
        proxy.server.server_close()


REPLIES = [(200, {"ok": True})] * 4


@pytest.fixture
def http_origin() -> Iterator[StubHTTP]:
    origin = StubHTTP(*REPLIES)
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def https_origin(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> Iterator[StubHTTP]:
    """An HTTPS broker stand-in that the client trusts (``FARCALL_CA_BUNDLE``)."""
    cert = ca.issue(["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.certfile, cert.keyfile)
    monkeypatch.setenv(tls.CA_BUNDLE_VARIABLE, str(ca.ca_file))
    origin = StubHTTP(*REPLIES, tls=context)
    yield origin
    origin.close()


def test_an_http_broker_is_reached_through_the_proxy_with_its_credentials(
    proxy_with: Callable[[str | None], Proxy], http_origin: StubHTTP, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = proxy_with("us@er:p:ss")
    monkeypatch.setenv("HTTP_PROXY", f"http://us%40er:p%3Ass@127.0.0.1:{proxy.port}")
    transport = Transport(http_origin.url + "/v1", {"X-Test": "kept"})
    try:
        first = transport.request("GET", "/endpoints")
        second = transport.request("POST", "/tasks", body=b"{}")
    finally:
        transport.close()
    assert (first.status, first.json(), second.status) == (200, {"ok": True}, 200)
    assert proxy.seen == [("GET", http_origin.url + "/v1/endpoints", basic("us@er:p:ss")),
                          ("POST", http_origin.url + "/v1/tasks", basic("us@er:p:ss"))]
    assert proxy.connections == 1  # the pooled connection to the proxy is kept alive
    assert [(method, path, body) for method, path, _, body in http_origin.requests] == [
        ("GET", "/v1/endpoints", b""), ("POST", "/v1/tasks", b"{}")]
    for _, _, headers, _ in http_origin.requests:
        assert headers["X-Test"] == "kept" and "Proxy-Authorization" not in headers


def test_an_https_broker_is_reached_through_one_authenticated_tunnel(
    proxy_with: Callable[[str | None], Proxy], https_origin: StubHTTP, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = proxy_with("alice:s3cret")
    monkeypatch.setenv("HTTPS_PROXY", f"http://alice:s3cret@127.0.0.1:{proxy.port}")
    transport = Transport(https_origin.url + "/v1", {})
    try:
        answers = [transport.request("GET", f"/endpoints/{n}").status for n in range(2)]
    finally:
        transport.close()
    assert answers == [200, 200]
    assert [path for _, path, _, _ in https_origin.requests] == ["/v1/endpoints/0", "/v1/endpoints/1"]
    host_port = https_origin.url.removeprefix("https://")
    assert proxy.seen == [("CONNECT", host_port, basic("alice:s3cret"))]
    assert all("Proxy-Authorization" not in headers for _, _, headers, _ in https_origin.requests)


def test_without_credentials_none_are_sent_and_a_demanding_proxy_refuses(
    proxy_with: Callable[[str | None], Proxy], http_origin: StubHTTP, https_origin: StubHTTP,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = proxy_with("alice:s3cret")
    monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")  # no scheme: http:// is meant
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    plain = Transport(http_origin.url, {})
    assert plain.request("GET", "/x").status == 407
    plain.close()
    tunnelled = Transport(https_origin.url, {})
    with pytest.raises(TransportError, match="407"):
        tunnelled.request("GET", "/x")
    tunnelled.close()
    assert [(method, auth) for method, _, auth in proxy.seen] == [("GET", None), ("CONNECT", None)]
    assert not http_origin.requests and not https_origin.requests


def test_no_proxy_exempts_the_broker(
    proxy_with: Callable[[str | None], Proxy], http_origin: StubHTTP, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = proxy_with(None)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    transport = Transport(http_origin.url, {})
    assert transport.request("GET", "/direct").status == 200
    transport.close()
    assert proxy.seen == [] and [path for _, path, _, _ in http_origin.requests] == ["/direct"]


@pytest.mark.parametrize(("variable", "broker"), [("HTTPS_PROXY", "https://broker.example.org"),
                                                  ("HTTP_PROXY", "http://broker.example.org")])
def test_an_https_proxy_url_is_refused_with_what_to_set(
    variable: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, "https://alice:s3cret@proxy.example.org:3128")
    with pytest.raises(ConfigurationError) as caught:
        Transport(broker, {})
    message = str(caught.value)
    assert f"{variable}=http://proxy.example.org:3128" in message, message
    assert "s3cret" not in message and "alice" not in message
    with pytest.raises(ConfigurationError, match=variable):
        Client(broker_url=broker, token="t")
    monkeypatch.setenv("NO_PROXY", "broker.example.org")
    Transport(broker, {}).close()  # an exempt broker does not care what the proxy is


def test_a_proxy_without_a_port_is_on_port_80_and_a_user_without_a_password_is_sent(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://bob@proxy.example.org")  # as urllib and websockets
    found = _proxy_for("https://broker.example.org")
    assert found is not None and (found.host, found.port) == ("proxy.example.org", 80)
    assert found.headers == {"Proxy-Authorization": basic("bob:")}
