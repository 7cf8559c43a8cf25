"""Upload grants: what lets an endpoint's workers use the data plane without its credential.

A worker runs user code, so it never holds the endpoint's credential; the agent hands it the
grant the broker sent in its ``Welcome``. A grant is HMAC-SHA256 of ``grant:<endpoint id>``
under the blob store's secret (shared by every replica), so any replica checks it without a
lookup, and it stops working when the endpoint is deleted. It allows blob uploads and
downloads, nothing else. Sent as ``X-Farcall-Grant: <endpoint id>:<grant>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from farcall.broker.errors import TooManyRequests, Unauthorized
from farcall.broker.services import Services

HEADER = "X-Farcall-Grant"


def sign(secret: bytes, endpoint_id: str) -> str:
    """The grant of ``endpoint_id`` under ``secret`` (urlsafe base64)."""
    digest = hmac.new(secret, b"grant:" + endpoint_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")


async def upload_grant(svc: Services, endpoint_id: str) -> str:
    """The grant the endpoint's ``Welcome`` carries."""
    return sign(await svc.blobs.secret(), endpoint_id)


async def check(svc: Services, value: str, address: str) -> str:
    """The endpoint whose grant ``value`` (``<endpoint id>:<grant>``) is; ``Unauthorized`` if it
    is forged or its endpoint was deleted (``TooManyRequests`` after too many failures from
    ``address``, as for tokens)."""
    endpoint_id, _, given = value.strip().partition(":")
    if endpoint_id and given:
        expected = sign(await svc.blobs.secret(), endpoint_id)
        if hmac.compare_digest(expected.encode(), given.encode()):
            if await svc.store.endpoints.get(endpoint_id) is not None:
                return endpoint_id
            why = f"the endpoint of this {HEADER} was deleted; its workers may not use blobs"
        else:
            why = f"the {HEADER} header is not a grant this broker gave"
    else:
        why = f"the {HEADER} header must be '<endpoint id>:<grant>', from the endpoint's welcome"
    wait = svc.auth_failures.take(address)
    if wait:
        raise TooManyRequests(
            "too many requests with a wrong token or grant from this address; wait, and check "
            "the credentials", wait)
    raise Unauthorized(why)
