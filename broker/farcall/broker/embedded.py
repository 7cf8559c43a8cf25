"""A whole broker in a background thread on 127.0.0.1, for demos, notebooks and tests.

``with EmbeddedBroker() as b: token = b.create_user("me")`` gives a broker at
``b.url`` with the in-process store and queue (unless ``settings`` say otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from farcall.broker import auth
from farcall.broker.app import create_app
from farcall.broker.asgi import WebSocketProtocol, redact_access_log
from farcall.broker.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0


class EmbeddedBroker:
    """Run the broker on a free loopback port until ``__exit__`` (or :meth:`stop`)."""

    def __init__(self, settings: Settings | None = None, log_level: str = "warning") -> None:
        self.settings = settings or Settings()
        self.app = create_app(self.settings)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,
            ws=WebSocketProtocol,
            ws_max_size=ws_max_size(self.settings),
        )
        redact_access_log()
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, name="farcall-embedded-broker", daemon=True
        )
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e

    def start(self) -> EmbeddedBroker:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the embedded broker did not start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedded broker did not start within {START_TIMEOUT} s")
            time.sleep(0.01)
        log.info("embedded broker on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(START_TIMEOUT)
        self._sock.close()

    def create_user(self, name: str) -> str:
        """Create a user on the running broker and return its token (thread-safe)."""
        loop: asyncio.AbstractEventLoop = self.app.state.loop
        future = asyncio.run_coroutine_threadsafe(
            auth.create_user(self.app.state.services.store.users, name), loop
        )
        return future.result(START_TIMEOUT)[1]

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def ws_max_size(settings: Settings) -> int:
    """Largest WebSocket message accepted (``Settings.max_frame_bytes``)."""
    return settings.max_frame_bytes
