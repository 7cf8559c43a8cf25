"""A keep-alive HTTP/1.1 client on the standard library, shared by threads.

Why not httpx or requests: on loopback a request through them spends about
0.4 ms in Python before it reaches the wire, more than the broker spends on a
task, and the Executor's round trip is made of such requests. This keeps a pool
of ``http.client`` connections and nothing else. ``HTTPS_PROXY`` /
``HTTP_PROXY`` / ``NO_PROXY`` are honoured as urllib does, for ``http://`` proxy
URLs (credentials in them are sent as ``Proxy-Authorization``); an ``https://``
proxy URL is refused (see ``_proxy_for``). Certificates are
verified as :mod:`farcall.tls` says; an untrusted one raises
:class:`~farcall.errors.CertificateError`, which is not a :class:`TransportError`
(retrying cannot help). Big bodies (data-plane blobs) are sent as parts without
being joined (``send_parts``) and read into one preallocated buffer (``read_into``).
"""

from __future__ import annotations

import base64
import http.client
import json
import mmap
import ssl
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from farcall import tls
from farcall.errors import ConfigurationError

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class TransportError(OSError):
    """The request did not get an HTTP answer (connection refused, reset, timed out)."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes | memoryview
    """A writable ``memoryview`` of one buffer for a 200 answer read by ``Transport.read_into``."""

    def json(self) -> Any:
        return json.loads(bytes(self.body))

    @property
    def text(self) -> str:
        return bytes(self.body).decode(errors="replace")


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
        proxy = self._proxy
        if proxy is not None:
            if self.https:  # a CONNECT tunnel, TLS to the broker inside it
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    proxy.host, proxy.port, timeout=self.timeout, context=self._ssl)
                conn.set_tunnel(self.host, self.port, headers=proxy.headers)
                return conn
            return http.client.HTTPConnection(proxy.host, proxy.port, timeout=self.timeout)
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """Send one request; a pooled connection that turns out closed is replaced once."""
        return self._exchange(method, path, body, headers, _read_all)

    def send_parts(self, method: str, path: str, parts: Sequence[memoryview],
                   headers: dict[str, str] | None = None) -> Response:
        """Send a body made of ``parts`` one after the other, never joined or copied, with
        its ``Content-Length``: how a data-plane blob (``Frames.blob_parts``) is uploaded."""
        views = [p if p.format == "B" and p.ndim == 1 else p.cast("B") for p in parts]
        size = sum(v.nbytes for v in views)
        return self._exchange(method, path, views, {**(headers or {}), "Content-Length": str(size)},
                              _read_all)

    def read_into(self, method: str, path: str, headers: dict[str, str] | None = None,
                  size: int | None = None) -> Response:
        """Like ``request``, but a 200 answer with a ``Content-Length`` is read straight into
        one buffer of that size (``readinto``: no chunks joined; ``allocate``), its body a
        writable ``memoryview``: for big downloads. With the ``size`` expected, the buffer is
        made while the answer is on its way."""
        return self._exchange(method, path, None, headers, _IntoBuffer(size))

    def _exchange(self, method: str, path: str, body: bytes | list[memoryview] | None,
                  headers: dict[str, str] | None, read: _Reader) -> Response:
        target = self.prefix + path
        all_headers = {**self.headers, **(headers or {})}
        if self._proxy is not None and not self.https:  # the proxy forwards each request
            target = self._origin + target
            all_headers.update(self._proxy.headers)
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            try:
                conn.request(method, target, body=body, headers=all_headers)
                read.sent()
                answer = conn.getresponse()
                data = read(answer)
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


POPULATE_FROM = 1 << 20
"""Buffers from this size are mapped with ``MAP_POPULATE`` (see ``allocate``)."""


def allocate(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes. A big one is an anonymous mapping whose pages the
    kernel maps at once (``MAP_POPULATE``): about twice as fast as ``bytearray(size)``, which
    zero-fills page by page, and that cost (~0.5 ms per MB here) is a good part of a download."""
    if size >= POPULATE_FROM and hasattr(mmap, "MAP_POPULATE"):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        return memoryview(mmap.mmap(-1, size, flags=flags))
    return memoryview(bytearray(size))


class _Reader:
    """Reads an answer's body; ``sent`` is called once the request is on its way."""

    def sent(self) -> None:
        pass

    def __call__(self, answer: http.client.HTTPResponse) -> bytes | memoryview:
        return answer.read()


_read_all = _Reader()


class _IntoBuffer(_Reader):
    """A 200 answer with a ``Content-Length`` read into one buffer (``allocate``), made as soon as
    the request is sent when its ``size`` is known (so it overlaps the server's first bytes)."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.buffer: memoryview | None = None

    def sent(self) -> None:
        if self.size and self.buffer is None:
            self.buffer = allocate(self.size)

    def __call__(self, answer: http.client.HTTPResponse) -> bytes | memoryview:
        if answer.status != 200 or answer.length is None:
            return answer.read()
        view = self.buffer
        if view is None or view.nbytes != answer.length:
            view = allocate(answer.length)
        got, size = 0, view.nbytes
        while got < size:
            n = answer.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(b"", size - got)
            got += n
        return view


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    headers: dict[str, str]
    """``Proxy-Authorization`` when the proxy URL holds credentials: sent on the ``CONNECT`` for
    an ``https://`` broker, on every request for an ``http://`` one."""


def _proxy_for(url: str) -> _Proxy | None:
    """The proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY`` name for ``url``, unless ``NO_PROXY``
    exempts its host.

    An ``https://`` proxy URL (TLS to the proxy itself) is refused rather than spoken to in
    plain text: for an ``https://`` broker it would need TLS inside TLS, which ``http.client``
    does not do. An ``http://`` proxy still carries the broker's TLS end to end (``CONNECT``).
    """
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy:
        return None
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    shown = f"{p.scheme}://{p.hostname}" + (f":{p.port}" if p.port else "")  # no credentials
    variable = f"{parts.scheme.upper()}_PROXY"
    if p.scheme != "http" or not p.hostname:
        raise ConfigurationError(
            f"{variable} is {shown}: farcall reaches {parts.scheme}:// brokers only through an "
            f"http:// proxy URL (the broker's own TLS still runs end to end through it); set "
            f"{variable}=http://{p.hostname or 'PROXY'}:{p.port or 'PORT'}, or exempt the broker's "
            f"host with NO_PROXY")
    headers = {}
    if p.username is not None:
        secret = f"{unquote(p.username)}:{unquote(p.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
    return _Proxy(p.hostname, p.port or 80, headers)  # as urllib and websockets default it
