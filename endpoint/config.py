"""Where an endpoint keeps its files, and its ``config.yaml``.

Layout under ``$FARCALL_HOME`` (default ``~/.farcall``)::

    config                     operator settings, TOML: broker_url, token
    endpoints/NAME/config.yaml this endpoint's configuration (``configure`` writes it)
    endpoints/NAME/endpoint.json  endpoint id and credential (mode 0600, written at registration)
    endpoints/NAME/endpoint.pid   pid of the running agent
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farcall import config as sdk_config
from farcall.config import farcall_home
from farcall.endpoint.engines import ENGINES, format_validation_error, validate_engine
from farcall.endpoint.errors import EndpointConfigError
from farcall.errors import ConfigurationError

__all__ = ["EndpointConfig", "configure", "endpoint_dir", "farcall_home", "load_config"]

CONFIG_FILE = "config.yaml"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class EndpointConfig(BaseModel):
    """The contents of ``config.yaml``. Unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(default=None, min_length=1, max_length=200)
    broker_url: str | None = None
    heartbeat_period: float = Field(default=10.0, gt=0)
    stop_timeout: float = Field(
        default=10.0, ge=0, description="seconds a stop lets running tasks finish"
    )
    engine: dict[str, Any] = Field(default_factory=lambda: {"type": "ProcessPoolEngine"})

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: dict[str, Any]) -> dict[str, Any]:
        validate_engine(value)
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    def resolved_broker_url(self) -> str:
        """``broker_url`` from the file, else ``FARCALL_BROKER_URL``, else the operator config."""
        try:
            return sdk_config.broker_url(self.broker_url)
        except ConfigurationError as e:
            raise EndpointConfigError(f"{e} (or set broker_url in the endpoint's config.yaml)") from None


def endpoint_dir(name: str) -> Path:
    """The endpoint's directory; the name must be a plain file name."""
    if not NAME_PATTERN.match(name):
        raise EndpointConfigError(
            f"invalid endpoint name {name!r}: use letters, digits, '_', '.' and '-' "
            "(starting with a letter or digit)"
        )
    return farcall_home() / "endpoints" / name


def operator_token() -> str:
    """The operator's user token: ``FARCALL_TOKEN``, else ``token`` in ``$FARCALL_HOME/config``."""
    try:
        return sdk_config.token()
    except ConfigurationError as e:
        raise EndpointConfigError(f"registering this endpoint needs your user token: {e}") from None


def load_config(name: str) -> EndpointConfig:
    """Read and validate ``endpoints/NAME/config.yaml``; errors name the file and the key."""
    path = endpoint_dir(name) / CONFIG_FILE
    if not path.is_file():
        raise EndpointConfigError(
            f"endpoint {name!r} is not configured ({path} does not exist); "
            f"run: farcall-endpoint configure {name}"
        )
    return parse_config(path.read_text(), str(path))


def parse_config(text: str, source: str = CONFIG_FILE) -> EndpointConfig:
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EndpointConfigError(f"{source}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise EndpointConfigError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        return EndpointConfig.model_validate(raw)
    except ValidationError as e:
        valid = list(EndpointConfig.model_fields)
        raise EndpointConfigError(f"{source}: {format_validation_error(e, '', valid)}") from None
    except EndpointConfigError as e:
        raise EndpointConfigError(f"{source}: {e}") from None


def configure(
    name: str,
    engine: str = "ProcessPoolEngine",
    broker_url: str | None = None,
    max_workers: int | None = None,
    force: bool = False,
) -> Path:
    """Write a commented ``config.yaml`` for a new endpoint and return its path."""
    if engine not in ENGINES:
        raise EndpointConfigError(
            f"unknown engine {engine!r}; valid choices: {', '.join(ENGINES)}"
        )
    directory = endpoint_dir(name)
    path = directory / CONFIG_FILE
    if path.exists() and not force:
        raise EndpointConfigError(
            f"endpoint {name!r} is already configured ({path}); edit that file, "
            "or pass --force to overwrite it"
        )
    text = config_template(name, engine, broker_url, max_workers)
    parse_config(text, str(path))  # never write a file that `start` would refuse
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(text)
    return path


def config_template(
    name: str, engine: str, broker_url: str | None, max_workers: int | None
) -> str:
    url_line = f"broker_url: {broker_url}" if broker_url else "# broker_url: https://broker.example.org"
    workers = max_workers or os.cpu_count() or 1
    chunk = ""
    if engine == "ProcessPoolEngine":
        chunk = (
            "  # Most tasks sent to one worker process in one message (short tasks are\n"
            "  # batched to cut overhead; long tasks always go one at a time).\n"
            "  max_chunk: 64\n"
        )
    return f"""\
# farcall endpoint "{name}"
# Written by `farcall-endpoint configure {name}`. Edit it, then run
# `farcall-endpoint start {name}`. Unknown keys are errors.

# Name shown to users in Client.get_endpoints().
display_name: {name}

# The broker to connect to. When absent: $FARCALL_BROKER_URL, then broker_url
# in $FARCALL_HOME/config.
{url_line}

# Seconds between heartbeats; the broker marks the endpoint offline after
# three missed ones.
heartbeat_period: 10

# On stop (SIGTERM, Ctrl-C, `farcall-endpoint stop`): seconds to let running
# tasks finish before they are abandoned (the broker hands them out again).
stop_timeout: 10

engine:
  # ThreadPoolEngine: threads inside the agent (I/O-bound functions).
  # ProcessPoolEngine: worker processes on this machine.
  type: {engine}
  # Number of workers (default: the number of CPUs).
  max_workers: {workers}
  # Tasks fetched ahead per worker, so workers never wait on the network.
  prefetch: 32
{chunk}"""
