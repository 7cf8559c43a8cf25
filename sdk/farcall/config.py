"""Where the SDK and the endpoint find the broker URL, the user token and the retry budget.

Order: an explicit argument, then ``FARCALL_BROKER_URL`` / ``FARCALL_TOKEN``,
then ``$FARCALL_HOME/config`` (TOML with ``broker_url`` and ``token``;
``FARCALL_HOME`` defaults to ``~/.farcall``). The retry budget: an explicit
``retry_seconds``, then ``FARCALL_RETRY_SECONDS``, then 30 s.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from farcall.errors import ConfigurationError, InvalidSetting

RETRY_SECONDS = 30.0
"""How long a ``Client`` keeps retrying a request by default (``FARCALL_RETRY_SECONDS``)."""


def farcall_home() -> Path:
    return Path(os.environ.get("FARCALL_HOME") or "~/.farcall").expanduser()


def config_path() -> Path:
    """``$FARCALL_HOME/config``: the user's settings (``farcall login`` writes it)."""
    return farcall_home() / "config"


def user_settings() -> dict[str, Any]:
    """``$FARCALL_HOME/config`` as a dict, or ``{}`` when there is no such file."""
    path = config_path()
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


def retry_seconds(explicit: float | None = None) -> float:
    """Seconds a ``Client`` keeps retrying a request while the broker is unreachable, answers
    503 or rate limits: ``explicit``, else ``FARCALL_RETRY_SECONDS``, else 30. A bad value
    raises :class:`InvalidSetting` naming where it came from."""
    if explicit is not None:
        return _seconds(explicit, f"retry_seconds={explicit!r}")
    raw = os.environ.get("FARCALL_RETRY_SECONDS", "").strip()
    if not raw:
        return RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    return _seconds(value, f"FARCALL_RETRY_SECONDS={raw!r}")


def _seconds(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0 <= float(value) < math.inf):
        raise InvalidSetting(
            f"{where} is not a retry budget: give a number of seconds, 0 or more (how long a "
            "Client keeps retrying while the broker is unreachable or busy; 0: never)")
    return float(value)


def save_user_settings(updates: dict[str, Any]) -> Path:
    """Set ``updates`` in ``$FARCALL_HOME/config``, keeping its other keys; the file's path.

    The file holds a token, so it is never readable by others, not even for a moment: the
    new content goes to a file created with mode 0600, which then replaces the old one
    (``FARCALL_HOME`` itself is created with mode 0700 when missing).
    """
    path = config_path()
    settings = {**user_settings(), **updates}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(toml_text(settings))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def toml_text(settings: dict[str, Any]) -> str:
    """``settings`` (what ``tomllib`` reads) as TOML: top-level values, then one ``[table]``
    per top-level table (tables within tables written inline)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in settings.items()
             if not isinstance(v, dict)]
    for name, table in settings.items():
        if isinstance(table, dict):
            lines += ["", f"[{_toml_key(name)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigurationError(f"cannot write {type(value).__name__} {value!r:.80} to a TOML file")
