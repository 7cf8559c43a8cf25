"""Where the SDK and the endpoint find the broker URL and the user token.

Order: an explicit argument, then ``FARCALL_BROKER_URL`` / ``FARCALL_TOKEN``,
then ``$FARCALL_HOME/config`` (TOML with ``broker_url`` and ``token``;
``FARCALL_HOME`` defaults to ``~/.farcall``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from farcall.errors import ConfigurationError


def farcall_home() -> Path:
    return Path(os.environ.get("FARCALL_HOME") or "~/.farcall").expanduser()


def user_settings() -> dict[str, Any]:
    """``$FARCALL_HOME/config`` as a dict, or ``{}`` when there is no such file."""
    path = farcall_home() / "config"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{path}: not valid TOML: {e}") from None


def broker_url(explicit: str | None = None) -> str:
    """The broker URL, without a trailing slash."""
    url = explicit or os.environ.get("FARCALL_BROKER_URL") or user_settings().get("broker_url")
    if not url:
        raise ConfigurationError(
            "no broker URL: pass broker_url=..., or set FARCALL_BROKER_URL, or put "
            'broker_url = "https://..." in $FARCALL_HOME/config'
        )
    url = str(url).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"broker URL {url!r} must start with http:// or https://")
    return url


def token(explicit: str | None = None) -> str:
    """The user's API token (``farcall-broker users create`` prints one)."""
    found = explicit or os.environ.get("FARCALL_TOKEN") or user_settings().get("token")
    if not found:
        raise ConfigurationError(
            "no token: pass token=..., or set FARCALL_TOKEN, or put token = \"...\" in "
            "$FARCALL_HOME/config (your broker operator creates one with "
            "'farcall-broker users create NAME')"
        )
    return str(found)
