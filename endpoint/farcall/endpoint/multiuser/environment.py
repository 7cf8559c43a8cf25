"""``user_environment.yaml``: variables the administrator sets in every user endpoint.

A mapping of names to strings or numbers (``MODULEPATH: /opt/modules``); the manager applies it
to the user endpoint's cleared environment before it sets HOME, USER and PATH.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from farcall.endpoint.config import USER_ENVIRONMENT
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.worker_env import NAME

__all__ = ["load_user_environment"]


def load_user_environment(directory: Path) -> dict[str, str]:
    """The variables in ``directory``'s ``user_environment.yaml`` ({} without the file); anything
    but a mapping of valid names to strings or numbers is an ``EndpointConfigError`` naming the
    file and the key."""
    path = Path(directory) / USER_ENVIRONMENT
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise EndpointConfigError(f"{path}: cannot be read: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EndpointConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EndpointConfigError(f"{path}: expected a mapping of variable names to values, "
                                  f"got {type(raw).__name__}")
    environment: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise EndpointConfigError(f"{path}: {name!r} is not a valid environment variable name "
                                      "(letters, digits and '_', not starting with a digit)")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            shown = "null" if value is None else type(value).__name__
            raise EndpointConfigError(
                f"{path}: {name}: expected a string or a number, got {shown}"
                + (" (quote it: \"true\")" if isinstance(value, bool) else ""))
        if "\0" in str(value):
            raise EndpointConfigError(f"{path}: {name}: a value may not contain a NUL character")
        environment[name] = str(value)
    return environment
