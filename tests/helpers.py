"""Helpers only the tests need (the ones bench/ needs too are in :mod:`harness`)."""

from __future__ import annotations

import ssl
from types import ModuleType
from typing import Any

import pytest


class FakeClock:
    """A ``time.monotonic`` that moves only when a test moves ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> FakeClock:
        """Make the ``time.monotonic`` that ``module`` calls this clock for the test (that is
        ``time.monotonic`` everywhere: for synchronous tests only)."""
        clock = cls()
        monkeypatch.setattr(module.time, "monotonic", clock)
        return clock


def fragile(x: int) -> float:
    """A task that fails for 0 (``ZeroDivisionError``): a remote failure on demand."""
    return 1 / x


def wait_for_file(path: str) -> str:
    """A task that runs until ``path`` exists (30 s at most): finished when the test says."""
    import os
    import time

    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


def serve_on_loopback(handler: type[Any], tls: ssl.SSLContext | None = None) -> tuple[Any, str]:
    """A ``ThreadingHTTPServer`` with ``handler`` on 127.0.0.1 (over TLS with a ``tls`` server
    context), serving in a daemon thread, and its URL; ``server.shutdown(); server.server_close()``
    ends it (within 0.05 s: ``shutdown`` waits out ``serve_forever``'s poll, half a second by
    default, in every test that stops one)."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}"


class StubHTTP:
    """An HTTP server on 127.0.0.1 answering queued ``(status, json_body)`` replies in order.

    Records every request as ``(method, path, headers, body)``; answers 500 when no reply is queued.
    """

    def __init__(self, *replies: tuple[int, Any], tls: ssl.SSLContext | None = None) -> None:
        import json
        from http.server import BaseHTTPRequestHandler

        self.replies = list(replies)
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stub.requests.append((self.command, self.path, dict(self.headers), body))
                status, reply = stub.replies.pop(0) if stub.replies else (500, {"message": "no reply"})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self.server, self.url = serve_on_loopback(Handler, tls)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
