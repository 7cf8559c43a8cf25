"""Registering an endpoint with the broker, and keeping its id and credential.

The first start registers with the operator's user token and stores the answer
in ``endpoint.json`` (mode 0600); later starts reuse it, so the endpoint id
stays the same across restarts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from farcall.endpoint.errors import RegistrationError
from farcall.errors import BrokerError

log = logging.getLogger(__name__)

CREDENTIALS_FILE = "endpoint.json"


@dataclass(frozen=True)
class Registration:
    endpoint_id: str
    credential: str
    name: str
    broker_url: str


def register_endpoint(
    broker_url: str, token: str, name: str, description: str = "", timeout: float = 30
) -> Registration:
    """``POST /v1/endpoints`` with the user token; the broker shows the credential only once."""
    from farcall.client import Client

    try:
        with Client(broker_url=broker_url, token=token, timeout=timeout, retry_seconds=timeout) as c:
            data = c.register_endpoint(name, description)
    except BrokerError as e:
        if e.status == 0:
            raise RegistrationError(
                f"cannot reach the broker at {broker_url} to register endpoint {name!r}: {e}. "
                "Check broker_url and that the broker is running."
            ) from None
        hint = " Check FARCALL_TOKEN." if e.status in (401, 403) else ""
        raise RegistrationError(
            f"the broker refused to register endpoint {name!r} ({e.status}): {e}.{hint}"
        ) from None
    return Registration(data["endpoint_id"], data["credential"], name, broker_url)


def load_registration(directory: Path) -> Registration | None:
    path = directory / CREDENTIALS_FILE
    if not path.is_file():
        return None
    try:
        return Registration(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise RegistrationError(
            f"{path} is damaged ({e}); delete it to register this endpoint again "
            "(it gets a new id)"
        ) from None


def save_registration(directory: Path, registration: Registration) -> None:
    """Write ``endpoint.json`` readable by its owner only, atomically."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / CREDENTIALS_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(registration), f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_registered(
    directory: Path, broker_url: str, name: str, token: str | None = None
) -> Registration:
    """The stored registration for this broker, or a new one (needs ``token``)."""
    stored = load_registration(directory)
    if stored is not None and stored.broker_url.rstrip("/") == broker_url.rstrip("/"):
        return stored
    if stored is not None:
        log.warning(
            "endpoint was registered with %s, now configured for %s: registering again",
            stored.broker_url, broker_url,
        )
    if token is None:
        from farcall.endpoint.config import operator_token

        token = operator_token()
    registration = register_endpoint(broker_url, token, name)
    save_registration(directory, registration)
    log.info("registered endpoint %s as %s", name, registration.endpoint_id)
    return registration
