"""The Action Provider API over HTTP: a sub-application mounted at ``/action-provider``.

Both route styles of the specification lead to the same operations (:mod:`.action_runner`):
``POST /run`` and ``POST /actions``; ``GET /{id}/status`` and ``GET /actions/{id}``;
``POST /{id}/cancel`` and ``POST /actions/{id}/cancel``; ``POST /{id}/release`` and
``DELETE /actions/{id}``; ``GET /{id}/log`` and ``GET /actions/{id}/log``; introspection
at ``GET /``. A sub-application, not a router, because its error answers are the
specification's ``{"code", "description"}`` while ``/v1`` keeps farcall's ``ErrorBody``: each
application has its own handlers. It shares the broker's ``Services``, so callers
authenticate with their farcall token and count against the same rate limits; it limits
bodies itself (the main app's limit skips it) to answer in its own form.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from farcall.broker import action_runner
from farcall.broker.actions import (
    INPUT_SCHEMA,
    ActionError,
    ActionLog,
    ActionProviderDescription,
    ActionRequest,
    ActionStatus,
    iso_duration,
)
from farcall.broker.asgi import BodyLimit
from farcall.broker.deps import Svc, User
from farcall.broker.errors import MAX_MESSAGE, ApiError, clip, error_summary, install_handlers
from farcall.broker.services import Services
from farcall.version import __version__

log = logging.getLogger(__name__)

PATH = "/action-provider"
"""Where the broker mounts it."""
CODES = {
    400: "BadActionRequest", 401: "UnauthorizedRequest", 403: "Forbidden", 404: "ActionNotFound",
    405: "MethodNotAllowed", 409: "ActionConflict", 413: "PayloadTooLarge",
    422: "RequestValidationError", 429: "TooManyRequests", 503: "ServiceUnavailable",
}
"""The specification's error code for each status (its reference toolkit's names)."""
NOT_JSON = ('the body could not be read as JSON; send an action request, {"request_id": ..., '
            '"body": {...}}, with Content-Type: application/json')
_WHY = {
    400: "the request is not one this provider can run (an unknown endpoint or function, say)",
    401: "no token, or an unknown or revoked one",
    403: "you may see this action but not manage it, or an endpoint credential was sent",
    404: "no such action: never started, released, expired, or not visible to you",
    409: "the action is still running (release), or the request_id was used for another request",
    413: "the request body is over the broker's limit",
    422: "the request does not match the schema (the body: see input_schema)",
    429: "too many requests with this token; wait 'Retry-After' seconds",
    503: "the broker's store or queue is not answering; retry later",
}


def _answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ActionError, "description": _WHY[code]} for code in codes}


_ACTION_ERRORS = _answers(401, 403, 404, 413, 422, 429, 503)

def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An error as the specification writes it: ``{"code", "description"}`` (the code from the
    status; farcall's own code and extra fields, such as the 422 ``detail``, are left out)."""
    return JSONResponse({"code": CODES.get(status, "ActionProviderError"),
                         "description": clip(message, MAX_MESSAGE)},
                        status_code=status, headers=headers)


def render(error: ApiError) -> Response:
    """A broker error (``farcall.broker.errors``) in the specification's form."""
    return error.response(error_response)


def _status(doc: ActionStatus, code: int = 200) -> JSONResponse:
    return JSONResponse(doc.document(), status_code=code)


def create_action_provider(svc: Services) -> FastAPI:
    """The sub-application, serving with the broker's ``svc``."""
    app = FastAPI(title="farcall Action Provider", version=__version__, docs_url=None,
                  redoc_url=None, description="Run farcall functions as steps of flows "
                  "(Action Provider specification 1.0); see docs/flows.md.")
    app.state.services = svc
    _install_handlers(app)

    @app.get("/", response_model=ActionProviderDescription, responses=_answers(413, 503))
    async def introspect(request: Request) -> JSONResponse:
        """What this provider runs and the JSON Schema of its input; open to anyone, as
        ``visible_to: ["public"]`` says."""
        here = str(request.url.replace(query="", fragment="")).rstrip("/")
        return JSONResponse(describe(here).model_dump(mode="json"))

    async def run(body: ActionRequest, user: User, svc: Svc) -> JSONResponse:
        """Start an action: 202 with its status; 200 with the same action's status when this
        ``request_id`` was sent before with the same request."""
        doc, new = await action_runner.run(svc, user, body)
        return _status(doc, 202 if new else 200)

    async def status(action_id: str, user: User, svc: Svc) -> JSONResponse:
        return _status(await action_runner.status(svc, user, action_id))

    async def cancel(action_id: str, user: User, svc: Svc) -> JSONResponse:
        """Cancel the action's tasks that have not ended; the status after that."""
        return _status(await action_runner.cancel(svc, user, action_id))

    async def release(action_id: str, user: User, svc: Svc) -> JSONResponse:
        """Forget an ended action (409 while it runs); its final status."""
        return _status(await action_runner.release(svc, user, action_id))

    async def action_log(action_id: str, user: User, svc: Svc,
                         limit: int = action_runner.LOG_LIMIT) -> JSONResponse:
        """What happened to the action and its tasks, oldest first."""
        found = await action_runner.log(svc, user, action_id, limit)
        return JSONResponse(found.model_dump(mode="json"))

    runs = {**_ACTION_ERRORS, **_answers(400, 409)}
    for path in ("/actions", "/run"):
        app.post(path, status_code=202, response_model=ActionStatus, responses=runs)(run)
    app.get("/actions/{action_id}", response_model=ActionStatus, responses=_ACTION_ERRORS)(status)
    app.post("/actions/{action_id}/cancel", response_model=ActionStatus,
             responses=_ACTION_ERRORS)(cancel)
    app.delete("/actions/{action_id}", response_model=ActionStatus,
               responses={**_ACTION_ERRORS, **_answers(409)})(release)
    app.get("/actions/{action_id}/log", response_model=ActionLog,
            responses=_ACTION_ERRORS)(action_log)
    app.get("/{action_id}/status", response_model=ActionStatus, responses=_ACTION_ERRORS)(status)
    app.post("/{action_id}/cancel", response_model=ActionStatus, responses=_ACTION_ERRORS)(cancel)
    app.post("/{action_id}/release", response_model=ActionStatus,
             responses={**_ACTION_ERRORS, **_answers(409)})(release)
    app.get("/{action_id}/log", response_model=ActionLog, responses=_ACTION_ERRORS)(action_log)

    app.add_middleware(BodyLimit, limit=svc.settings.max_payload_bytes, render=render,
                       concurrent=svc.settings.max_uploads_per_user)
    return app


def describe(base_url: str) -> ActionProviderDescription:
    """The introspection document of the provider at ``base_url``."""
    return ActionProviderDescription(
        globus_auth_scope=base_url,
        title="farcall",
        subtitle="Run a registered farcall function on an endpoint, as a step of a flow",
        description=(
            "Runs tasks (a registered function with JSON arguments) on a farcall endpoint and "
            "reports their JSON results in details.results, one entry per task in order. "
            "Authenticate with your farcall token. The input takes the current form of the "
            "Globus Compute action provider (endpoint_id, tasks: [{function_id, args, kwargs}]) "
            "or its earlier form (endpoint, function, args, kwargs or payload, tasks)."),
        keywords=["farcall", "compute", "function", "FaaS", "HPC"],
        admin_contact="the operator of this farcall broker",
        maximum_deadline=iso_duration(action_runner.RELEASE_AFTER),
        input_schema=INPUT_SCHEMA,
    )


def _install_handlers(app: FastAPI) -> None:
    """Every failure under ``/action-provider`` answered as ``{"code", "description"}``: the
    broker's handlers, writing in the specification's form; a body that is not JSON is a 400."""
    install_handlers(app, respond=error_response, body_hint=NOT_JSON)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_request", NOT_JSON)
        return error_response(422, "invalid_request", f"invalid request: {error_summary(errors, 3)}")

    app.add_exception_handler(RequestValidationError, validation_error)
