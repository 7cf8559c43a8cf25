"""What every REST route shares: its dependencies (the replica's ``Services``, the user a token
names), the error answers it documents in the OpenAPI document, and the JSON answer of the
hot routes.

Where a 413 (or any error status) is documented: ``_WHY`` says what each status means, and
``ANY_ERRORS``/``USER_ERRORS``/``OBJECT_ERRORS`` are the sets routes declare.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from farcall.broker.services import Services
from farcall.protocol.rest import ErrorBody

bearer = HTTPBearer(auto_error=False, description="a user token (fcu_...)")
"""The ``Authorization: Bearer`` scheme of user tokens, as the OpenAPI document names it."""

_WHY = {
    400: "the request is malformed (a Content-Length that is not a number, JSON nested too deep)",
    401: "no token, or an unknown or revoked one",
    403: "the credential may not do this: an endpoint credential on a user route, a shared "
         "object's owner-only action, or a quota (endpoints, functions, blob bytes) reached",
    408: "the request body sent nothing for FARCALL_BODY_TIMEOUT seconds; send it again",
    404: "no such object, or not yours (nor shared with you)",
    413: "the request body is over the broker's limit",
    422: "the request does not match the schema; 'detail' says where",
    429: "too many requests (per token), too many failed authentications (per address), or the "
         "open-task quota reached; wait 'Retry-After' seconds",
    503: "the broker's store or queue is not answering (unavailable), or the store is full "
         "(store_full); retry later",
}


def error_answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the ``ErrorBody`` schema."""
    answers: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        answers[code] = {"model": ErrorBody, "description": _WHY[code]}
        if code == 429:
            answers[code]["headers"] = {"Retry-After": {
                "description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
    return answers


def with_conflict(answers: dict[int | str, dict[str, Any]], why: str
                  ) -> dict[int | str, dict[str, Any]]:
    """``answers`` and a 409 (``ErrorBody``) that says ``why`` for this route."""
    return {**answers, 409: {"model": ErrorBody, "description": why}}


ANY_ERRORS = error_answers(400, 413)
"""What any route may answer: the body limit and the body reader apply to every request."""
USER_ERRORS = error_answers(400, 401, 403, 413, 422, 429, 503)
"""What any route taking a user token may answer."""
OBJECT_ERRORS = error_answers(400, 401, 403, 404, 413, 422, 429, 503)
"""What a route about one object (by id) may answer."""


def services_of(request: Request) -> Services:
    """The replica's ``Services`` (``create_app`` puts them on the app's state)."""
    svc: Services = request.app.state.services
    return svc


async def _user(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> str:
    """The id of the user whose token came with the request (401/403/429 otherwise)."""
    svc = services_of(request)
    address = request.client.host if request.client else ""
    principal = await svc.authenticate(creds.credentials if creds else None, address)
    svc.charge(principal)
    return principal.id


User = Annotated[str, Depends(_user)]
"""A route parameter: the authenticated user's id, the request counted against their token."""
Svc = Annotated[Services, Depends(services_of)]
"""A route parameter: the replica's ``Services``."""


def json_response(model: Any, *, exclude_unset: bool = False) -> Response:
    """A model as JSON, without FastAPI validating it again (the hot routes)."""
    return Response(model.model_dump_json(exclude_unset=exclude_unset),
                    media_type="application/json")
