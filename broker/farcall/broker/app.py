"""The broker's HTTP and WebSocket API (docs/protocol.md), as a FastAPI app.

Routes only talk to the :class:`Store` and :class:`TaskQueue` interfaces. User
payloads (function, args, data) pass through as opaque strings.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Body, Depends, FastAPI, Request, Response, Security, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from farcall.broker import auth, endpoint_channel, result_stream
from farcall.broker.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    install_handlers,
)
from farcall.broker.queue.base import TaskQueue
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.store.base import TERMINAL, Record, Store
from farcall.broker.submission import submit_batch
from farcall.messages import (
    BatchSubmission,
    BatchSubmitted,
    EndpointRegistration,
    FunctionRegistration,
    TaskIds,
    now,
    version_mismatch,
)
from farcall.version import __version__

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="a user token (fcu_...)")


def create_app(
    settings: Settings | None = None, store: Store | None = None, queue: TaskQueue | None = None
) -> FastAPI:
    """Build the broker app; ``store``/``queue`` override the ones the settings choose."""
    svc = Services.build(settings or Settings.from_env(), store, queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()
        await svc.start()
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(
        title="farcall broker",
        version=__version__,
        description="Federated function-as-a-service broker (protocol v1).",
        lifespan=lifespan,
    )
    app.state.services = svc
    install_handlers(app)
    app.include_router(_router)

    @app.websocket("/v1/endpoints/{endpoint_id}/connect")
    async def endpoint_connect(ws: WebSocket, endpoint_id: str) -> None:
        await endpoint_channel.serve(ws, svc, endpoint_id)

    @app.websocket("/v1/task_groups/{task_group_id}/results")
    async def task_group_results(ws: WebSocket, task_group_id: str) -> None:
        await result_stream.serve(ws, svc, task_group_id)

    app.add_middleware(BodyLimit, limit=svc.settings.max_payload_bytes)
    return app


# ------------------------------------------------------------------ request plumbing


class BodyLimit:
    """Refuse bodies over the limit (413), by Content-Length and by bytes actually received."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await InvalidRequest("Content-Length is not a number").response()(
                    scope, receive, send
                )
                return
            if declared > self.limit:
                await self._too_large()(scope, receive, send)
                return
            if declared == 0:
                await self.app(scope, receive, send)
                return
        elif b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> Response:
        return PayloadTooLarge(
            f"request body is over the limit of {self.limit} bytes (FARCALL_MAX_PAYLOAD_BYTES); "
            "send fewer tasks per batch or smaller arguments"
        ).response()


def _services(request: Request) -> Services:
    return request.app.state.services


async def _user(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> str:
    """The id of the user whose token came with the request (401/403 otherwise)."""
    if creds is None:
        raise Unauthorized("no token: send 'Authorization: Bearer <your user token>'")
    principal = await _services(request).authenticate_user(creds.credentials)
    if principal is None:
        raise Unauthorized(
            "the token is unknown or revoked; ask your broker operator for a new one"
        )
    if principal.kind != "user":
        raise Forbidden(
            "an endpoint credential may only open its endpoint's channel; use a user token"
        )
    return principal.id


User = Annotated[str, Depends(_user)]
Svc = Annotated[Services, Depends(_services)]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(pydantic_core.to_json(obj), status_code=status, media_type="application/json")


# ------------------------------------------------------------------ routes

_router = APIRouter(prefix="/v1")


@_router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: answers without a token."""
    return {"status": "ok", "version": __version__}


# ---- functions


@_router.post("/functions")
async def register_function(body: FunctionRegistration, user: User, svc: Svc) -> dict[str, str]:
    function_id = str(uuid.uuid4())
    await svc.store.put_function(
        {
            "function_id": function_id,
            "user_id": user,
            "function_name": body.function_name,
            "description": body.description,
            "function": body.function,
            "created_at": now(),
        }
    )
    return {"function_id": function_id}


async def _own_function(svc: Services, user: str, function_id: str) -> Record:
    found = (await svc.store.get_functions([function_id])).get(function_id)
    if found is None or found["user_id"] != user:
        raise NotFound(f"function {function_id} not found; register it first")
    return found


@_router.get("/functions/{function_id}")
async def get_function(function_id: str, user: User, svc: Svc) -> Response:
    f = await _own_function(svc, user, function_id)
    keys = ("function_id", "function_name", "description", "function", "created_at")
    return _json({k: f.get(k) for k in keys})


@_router.delete("/functions/{function_id}")
async def delete_function(function_id: str, user: User, svc: Svc) -> dict[str, Any]:
    await _own_function(svc, user, function_id)
    await svc.store.delete_function(function_id)
    svc.owners.pop(f"fn:{function_id}")
    return {"function_id": function_id, "deleted": True}


# ---- endpoints


@_router.post("/endpoints")
async def register_endpoint(body: EndpointRegistration, user: User, svc: Svc) -> dict[str, str]:
    endpoint_id = str(uuid.uuid4())
    credential = auth.new_token(auth.ENDPOINT_PREFIX)
    await svc.queue.declare(endpoint_id)
    await svc.store.put_endpoint(
        {
            "endpoint_id": endpoint_id,
            "user_id": user,
            "name": body.name,
            "description": body.description,
            "created_at": now(),
        },
        auth.token_hash(credential),
    )
    return {"endpoint_id": endpoint_id, "name": body.name, "credential": credential}


def _online(svc: Services, ep: Record) -> bool:
    seen = ep.get("last_seen")
    return (
        bool(ep.get("connected"))
        and seen is not None
        and now() - seen < svc.settings.endpoint_timeout
    )


def _endpoint_view(svc: Services, ep: Record) -> dict[str, Any]:
    return {
        "endpoint_id": ep["endpoint_id"],
        "name": ep["name"],
        "description": ep.get("description", ""),
        "status": "online" if _online(svc, ep) else "offline",
        "created_at": ep["created_at"],
        "last_heartbeat": ep.get("last_heartbeat"),
    }


async def _own_endpoint(svc: Services, user: str, endpoint_id: str) -> Record:
    ep = await svc.store.get_endpoint(endpoint_id)
    if ep is None or ep["user_id"] != user:
        raise NotFound(f"endpoint {endpoint_id} not found; list yours with GET /v1/endpoints")
    return ep


@_router.get("/endpoints")
async def list_endpoints(user: User, svc: Svc) -> dict[str, list[dict[str, Any]]]:
    return {"endpoints": [_endpoint_view(svc, ep) for ep in await svc.store.list_endpoints(user)]}


@_router.get("/endpoints/{endpoint_id}")
async def get_endpoint(endpoint_id: str, user: User, svc: Svc) -> dict[str, Any]:
    return _endpoint_view(svc, await _own_endpoint(svc, user, endpoint_id))


@_router.get("/endpoints/{endpoint_id}/status")
async def endpoint_status(endpoint_id: str, user: User, svc: Svc) -> dict[str, Any]:
    ep = await _own_endpoint(svc, user, endpoint_id)
    hb = ep.get("heartbeat") or {}
    return {
        "endpoint_id": endpoint_id,
        "name": ep["name"],
        "status": "online" if _online(svc, ep) else "offline",
        "last_heartbeat": ep.get("last_heartbeat"),
        "workers": hb.get("workers", 0),
        "idle_workers": hb.get("idle_workers", 0),
        "pending_tasks": hb.get("pending_tasks", 0),
        "running_tasks": hb.get("running_tasks", 0),
        "queued_tasks": ep.get("queued_tasks", 0),
        "engine": hb.get("engine", ""),
        "details": hb.get("details", {}),
        "versions": hb.get("versions"),
    }


@_router.delete("/endpoints/{endpoint_id}")
async def delete_endpoint(endpoint_id: str, user: User, svc: Svc) -> dict[str, Any]:
    await _own_endpoint(svc, user, endpoint_id)
    await svc.store.delete_endpoint(endpoint_id)
    svc.owners.pop(f"ep:{endpoint_id}")
    await svc.queue.delete(endpoint_id)
    return {"endpoint_id": endpoint_id, "deleted": True}


# ---- task groups


@_router.post("/task_groups")
async def create_task_group(
    user: User, svc: Svc, body: Annotated[dict[str, Any] | None, Body()] = None
) -> dict[str, str]:
    task_group_id = str(uuid.uuid4())
    await svc.store.create_task_group(task_group_id, user, now())
    return {"task_group_id": task_group_id}


async def _check_group(svc: Services, user: str, task_group_id: str) -> None:
    if await svc.store.get_task_group_owner(task_group_id) != user:
        raise NotFound(
            f"task group {task_group_id} not found; create one with POST /v1/task_groups"
        )


@_router.get("/task_groups/{task_group_id}")
async def get_task_group(task_group_id: str, user: User, svc: Svc) -> dict[str, Any]:
    await _check_group(svc, user, task_group_id)
    return {
        "task_group_id": task_group_id,
        "task_ids": await svc.store.get_task_group_tasks(task_group_id),
    }


# ---- tasks


@_router.post("/tasks", response_model=BatchSubmitted)
async def submit_tasks(batch: BatchSubmission, user: User, svc: Svc) -> Response:
    """Record a batch (one store pipeline) and queue it whole, as one confirmed message."""
    return _json(await submit_batch(svc, user, batch))


def task_view(rec: Record) -> dict[str, Any]:
    """A task record as the REST API shows it; ``data``/``error`` only once terminal."""
    out = {
        k: rec.get(k)
        for k in (
            "task_id",
            "task_group_id",
            "endpoint_id",
            "function_id",
            "state",
            "transitions",
            "completed_at",
            "submitter",
            "worker",
        )
    }
    if rec["state"] in TERMINAL:
        out["data"], out["error"] = rec.get("data", ""), rec.get("error", "")
    mismatch = version_mismatch(rec.get("submitter"), rec.get("worker"))
    if mismatch:
        out["warnings"] = [mismatch]
    return out


@_router.get("/tasks/{task_id}")
async def get_task(task_id: str, user: User, svc: Svc) -> Response:
    (rec,) = await svc.store.get_tasks([task_id])
    if rec is None or rec["user_id"] != user:
        raise NotFound(f"task {task_id} not found (unknown, not yours, or its result expired)")
    return _json(task_view(rec))


@_router.post("/tasks/status")
async def tasks_status(body: TaskIds, user: User, svc: Svc) -> Response:
    ids = list(dict.fromkeys(body.task_ids))
    records = await svc.store.get_tasks(ids)
    return _json(
        {"tasks": {r["task_id"]: task_view(r) for r in records if r and r["user_id"] == user}}
    )
