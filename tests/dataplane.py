"""A small data-plane server on loopback, as the broker's blob routes answer (docs/protocol.md),
for unit tests of the SDK's and the worker's HTTP side of it."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from farcall import blobs
from farcall.serialize import INLINE_BYTES
from tests.helpers import serve_on_loopback

TOKEN = "fcu_blob-test"
GRANT = "ep-1:grant"
"""The ``X-Farcall-Grant`` value the server takes (as ``DataAccess.grant`` carries it)."""


Fault = int | str
"""What the data plane does to a request instead of serving it: an HTTP status (answered with a
JSON error body; 429 says ``retry_after``), ``"cut"`` (a download: headers and half the body,
then the connection closed; an upload: half the body read, then closed), or ``"short"`` (a
download: a whole answer of one byte less than the blob)."""


class DataPlane:
    """``POST /v1/blobs`` and ``GET /v1/blobs/{id}`` as the broker answers them (bearer token or
    ``X-Farcall-Grant``; 411 without Content-Length, 413 over ``limit``, 404 JSON unknown).

    ``faults`` are taken one per blob request, in order, while there are any (see ``Fault``);
    ``served`` counts blob requests by method, faulted ones included."""

    def __init__(self, limit: int = 1 << 30) -> None:
        self.limit = limit
        self.blobs: dict[str, bytes] = {}
        self.uploads: list[dict[str, str]] = []
        """Headers of each upload."""
        self.faults: list[Fault] = []
        self.served: dict[str, int] = {"GET": 0, "POST": 0}
        self._lock = threading.Lock()
        plane = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, error: str, message: str) -> None:
                self._reply(status, json.dumps({"error": error, "message": message}).encode())

            def _allowed(self) -> bool:
                if (self.headers.get("Authorization") == f"Bearer {TOKEN}"
                        or self.headers.get(blobs.GRANT_HEADER) == GRANT):
                    return True
                self._json(401, "unauthorized", "no valid token")
                return False

            def _fault(self) -> Fault | None:
                with plane._lock:
                    plane.served[self.command] += 1
                    return plane.faults.pop(0) if plane.faults else None

            def _status(self, status: int) -> None:
                if status == 429:
                    self._reply(429, json.dumps({"error": "rate_limited", "message": "slow down",
                                                 "retry_after": 0.05}).encode())
                else:
                    self._json(status, "unavailable", f"fault {status}: retry later")

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                if not self._allowed():
                    return
                fault = self._fault()
                length = self.headers.get("Content-Length")
                if fault == "cut":
                    self.rfile.read(int(length or 0) // 2)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(fault, int):
                    self.rfile.read(int(length or 0))
                    self._status(fault)
                    return
                if length is None:
                    self._json(411, "length_required", "send Content-Length")
                    return
                if int(length) > plane.limit:
                    self.rfile.read(int(length))
                    self._json(413, "payload_too_large", f"the blob of {length} bytes is over the "
                               f"limit of {plane.limit} bytes; raise FARCALL_MAX_TASK_BYTES")
                    return
                chunks, left = [], int(length)
                while left:
                    chunk = self.rfile.read(min(left, 4 << 20))
                    chunks.append(chunk)
                    left -= len(chunk)
                blob_id = f"b{len(plane.blobs)}"
                plane.blobs[blob_id] = b"".join(chunks)
                plane.uploads.append(dict(self.headers))
                self._reply(201, json.dumps({"blob_id": blob_id, "size": int(length)}).encode())

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/v1/limits":
                    self._reply(200, json.dumps({"max_task_bytes": plane.limit,
                                                 "max_payload_bytes": 10 << 20,
                                                 "inline_bytes": INLINE_BYTES}).encode())
                    return
                if not self._allowed():
                    return
                fault = self._fault()
                if isinstance(fault, int):
                    self._status(fault)
                    return
                body = plane.blobs.get(self.path.removeprefix("/v1/blobs/"))
                if body is None:
                    self._json(404, "not_found", "no such blob (or it expired)")
                    return
                if fault == "cut":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._reply(200, body[:-1] if fault == "short" else body, "application/octet-stream")

        self.server, self.url = serve_on_loopback(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
