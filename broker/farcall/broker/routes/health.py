"""``GET /v1/health``: the route; what it checks is ``farcall.broker.health``."""

from __future__ import annotations

from fastapi import APIRouter, Response

from farcall.broker.deps import ANY_ERRORS, Svc
from farcall.broker.health import check as check_health
from farcall.protocol.rest import Health

router = APIRouter(prefix="/v1")


@router.get("/health", response_model=Health, responses={**ANY_ERRORS, 503: {
    "model": Health,
    "description": "a backing service (Redis or RabbitMQ) is not answering; 'services' says which"}})
async def health(svc: Svc) -> Response:
    """Whether the broker can serve: 200 when its store and queue answer, 503 (saying which
    is down) while one does not. Answers without a token."""
    status, body = await check_health(svc)
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")
