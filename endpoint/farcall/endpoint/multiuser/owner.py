"""Whom a manager run by an ordinary account serves: its owner, the broker user it belongs to.

Such a manager cannot change user, so every user endpoint it starts runs as its own account;
serving anyone else would lend them that account. As Globus Compute's does, it serves its
owner's identity only. It learns who that is from the broker, once, with the token of the
account's user (``GET /v1/whoami``, and its ``owner`` role on the endpoint), and keeps the
answer in ``owner.json`` beside ``config.yaml`` (0600), so later starts need no token.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from farcall import config as sdk_config
from farcall.endpoint.multiuser.errors import OwnerUnknown
from farcall.errors import ConfigurationError, FarcallError

__all__ = ["OWNER_FILE", "Owner", "learn_owner", "load_owner", "resolve_owner", "save_owner"]

OWNER_FILE = "owner.json"
ASK_SECONDS = 10.0
"""How long asking the broker may keep retrying."""


@dataclass(frozen=True)
class Owner:
    """The broker user a manager belongs to (``user_id`` is what ``StartUserEndpoint`` names)."""

    endpoint_id: str
    user_id: str
    username: str


def load_owner(directory: Path, endpoint_id: str) -> Owner | None:
    """The owner recorded for the manager ``endpoint_id``; None if none is (or another id's)."""
    try:
        raw = json.loads((Path(directory) / OWNER_FILE).read_text())
        owner = Owner(str(raw["endpoint_id"]), str(raw["user_id"]), str(raw["username"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return owner if owner.endpoint_id == endpoint_id and owner.user_id else None


def save_owner(directory: Path, owner: Owner) -> None:
    """Record ``owner`` in ``owner.json`` (0600, replaced at once)."""
    path = Path(directory) / OWNER_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(owner), f)
    os.replace(tmp, path)


def learn_owner(broker_url: str, endpoint_id: str, token: str, name: str) -> Owner:
    """Ask the broker who ``token`` is and whether they own ``endpoint_id``; ``OwnerUnknown``
    unless they do."""
    from farcall.client import Client

    try:
        with Client(broker_url=broker_url, token=token, retry_seconds=ASK_SECONDS) as client:
            me = client.whoami()
            role = client.get_endpoint(endpoint_id).get("role")
    except FarcallError as e:
        raise OwnerUnknown(
            f"multi-user endpoint {name} does not run as root, so it serves only its owner, and "
            f"the broker at {broker_url} could not say who that is: {e}. Start it again once the "
            "broker answers, with its owner's token (FARCALL_TOKEN)") from None
    if role != "owner":
        raise OwnerUnknown(
            f"multi-user endpoint {name} does not run as root, so it serves only its owner, but "
            f"the token it was started with is user {me.get('username')!r}'s, who does not own "
            f"endpoint {endpoint_id} ({role or 'no role'}): start it with its owner's token "
            "(FARCALL_TOKEN)")
    return Owner(endpoint_id, str(me["identity_id"]), str(me["username"]))


def resolve_owner(directory: Path, broker_url: str, endpoint_id: str, name: str) -> Owner:
    """The manager's owner: the one recorded for ``endpoint_id``, else asked of the broker with
    the operator's token (``FARCALL_TOKEN``, or the token in ``$FARCALL_HOME/config``) and
    recorded. ``OwnerUnknown`` says what to do when neither works."""
    owner = load_owner(directory, endpoint_id)
    if owner is not None:
        return owner
    try:
        token = sdk_config.token()
    except ConfigurationError:
        raise OwnerUnknown(
            f"multi-user endpoint {name} does not run as root, so it serves only its owner (as "
            f"this account), and it does not know who that is yet: start it once with its "
            f"owner's token (FARCALL_TOKEN=... farcall-endpoint start {name}); it records the "
            f"answer in {Path(directory) / OWNER_FILE}. Or run it as root with an identity "
            "mapping to serve every user as their own account") from None
    owner = learn_owner(broker_url, endpoint_id, token, name)
    save_owner(directory, owner)
    return owner
