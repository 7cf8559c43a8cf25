"""The broker's ASGI app: its routes, its two WebSockets and its error handlers, on one port.

``create_app`` assembles the pieces (docs/protocol.md describes the API):
:mod:`.routes` (every REST route, one module per resource, timers and the data plane's
blobs among them), :mod:`.client_stream` (a client's task group stream),
:mod:`.endpoint_channel` (an endpoint's session), :mod:`.asgi` (the body limit and timeout)
and :mod:`.errors` (every failure answered as JSON); :mod:`.action_provider` (the Action
Provider API, its own sub-application) is mounted at ``/action-provider``; the
:mod:`.scheduler` that fires timers and the :mod:`.requeue` sweep run for the app's lifetime.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket

from farcall.broker import action_provider, client_stream, endpoint_channel
from farcall.broker.asgi import BodyLimit, BodyTimeout, MemoryTrim
from farcall.broker.errors import install_handlers
from farcall.broker.queue.base import TaskQueue
from farcall.broker.requeue import Requeuer
from farcall.broker.routes import blobs, router
from farcall.broker.scheduler import TimerScheduler
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.store.base import Store
from farcall.version import __version__


def create_app(
    settings: Settings | None = None, store: Store | None = None, queue: TaskQueue | None = None
) -> FastAPI:
    """Build the broker app; ``store``/``queue`` override the ones the settings choose."""
    svc = Services.build(settings or Settings.from_env(), store, queue)
    loops = [TimerScheduler(svc), Requeuer(svc)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()
        await svc.start()
        for loop in loops:
            loop.start()
        try:
            yield
        finally:
            for loop in loops:
                await loop.stop()
            await svc.close()

    app = FastAPI(
        title="farcall broker",
        version=__version__,
        description="Federated function-as-a-service broker (protocol v1).",
        lifespan=lifespan,
    )
    app.state.services = svc
    install_handlers(app)
    app.include_router(router)
    app.mount(action_provider.PATH, action_provider.create_action_provider(svc))

    @app.websocket("/v1/endpoints/{endpoint_id}/connect")
    async def endpoint_connect(ws: WebSocket, endpoint_id: str) -> None:
        await endpoint_channel.serve(ws, svc, endpoint_id)

    @app.websocket("/v1/task_groups/{task_group_id}/results")
    async def task_group_stream(ws: WebSocket, task_group_id: str) -> None:
        await client_stream.serve(ws, svc, task_group_id)

    app.add_middleware(BodyLimit, limit=svc.settings.max_payload_bytes,
                       skip=(action_provider.PATH, blobs.PATH),  # they limit their own bodies
                       concurrent=svc.settings.max_uploads_per_user)
    app.add_middleware(BodyTimeout, seconds=svc.settings.body_timeout)
    app.add_middleware(MemoryTrim)
    return app
