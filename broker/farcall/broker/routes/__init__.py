"""The broker's REST API (docs/protocol.md), one module per resource, assembled into ``router``.

Routes only talk to the store's narrow interfaces, the task queue and the broker modules
named for each job (``submission``, ``endpoint_control``, ``listing``); user payloads
(function, args, data) pass through as opaque strings. Every route documents its error
answers (``deps``).

Who may do what: an object's owner everything; a user an endpoint or function is shared
with may use and read it (others who can see it get 403 for owner-only actions); everyone
else gets 404, as for an unknown id. Tasks, task groups and timers are their submitter's
alone.
"""

from __future__ import annotations

from fastapi import APIRouter

from farcall.broker.routes import (
    blobs,
    endpoints,
    functions,
    health,
    sharing,
    tasks,
    timers,
    tokens,
    whoami,
)

router = APIRouter()
"""Every REST route of the broker (``create_app`` includes it)."""
for _part in (health, functions, endpoints, sharing, tokens, tasks, whoami, timers, blobs):
    router.include_router(_part.router)
