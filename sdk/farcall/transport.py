"""A keep-alive HTTP/1.1 client on the standard library, shared by threads.

Why not httpx or requests: on loopback a request through them spends about
0.4 ms in Python before it reaches the wire, more than the broker spends on a
task, and the Executor's round trip is made of such requests. This keeps a pool
of ``http.client`` connections and nothing else. ``HTTPS_PROXY`` /
``HTTP_PROXY`` / ``NO_PROXY`` are honoured as urllib does. Certificates are
verified as :mod:`farcall.tls` says; an untrusted one raises
:class:`~farcall.errors.CertificateError`, which is not a :class:`TransportError`
(retrying cannot help).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from farcall import tls

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class TransportError(OSError):
    """The request did not get an HTTP answer (connection refused, reset, timed out)."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Transport:
    """Requests to one origin (``base_url``, with an optional path prefix) over pooled connections.

    With an ``Authorization`` header and a plain ``http://`` URL to a host that
    is not loopback, warns once (:class:`farcall.tls.InsecureBrokerWarning`).
    """

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.headers = dict(headers)
        self.timeout = timeout
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._proxy = _proxy_for(base_url)
        self._ssl = tls.client_context() if self.https else None
        if any(name.lower() == "authorization" for name in headers):
            tls.warn_if_insecure(base_url, stacklevel=3)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self._proxy is not None:
            host, port = self._proxy
            if self.https:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=self._ssl)
                conn.set_tunnel(self.host, self.port)
                return conn
            return http.client.HTTPConnection(host, port, timeout=self.timeout)
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """Send one request; a pooled connection that turns out closed is replaced once."""
        target = self.prefix + path
        if self._proxy is not None and not self.https:
            target = self._origin + target
        all_headers = {**self.headers, **(headers or {})}
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            try:
                conn.request(method, target, body=body, headers=all_headers)
                answer = conn.getresponse()
                data = answer.read()
            except _STALE as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: try a fresh one
                raise TransportError(f"{type(e).__name__}: {e}") from e
            except ssl.SSLCertVerificationError as e:
                conn.close()
                raise tls.certificate_error(self._origin, e) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise TransportError(f"{type(e).__name__}: {e}") from e
            if answer.will_close:
                conn.close()
            else:
                with self._lock:
                    self._idle.append(conn)
            return Response(answer.status, answer.reason, data)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _proxy_for(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy:
        return None
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return (p.hostname or "", p.port or 8080)
