"""Broker settings, read from ``FARCALL_*`` environment variables.

A missing Redis or RabbitMQ URL selects the in-process store or queue
(embedded mode), so one command can run the whole system on a laptop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from farcall.protocol.channel import START_RESEND_SECONDS
from farcall.serialize import INLINE_BYTES

MB = 1024 * 1024
ENV_PREFIX = "FARCALL_"

__all__ = ["ENV_PREFIX", "MB", "Settings", "SettingsError"]


class Settings(BaseSettings):
    """Everything the broker reads from its environment.

    ``Settings(...)`` takes only what it is given (tests build it by hand while
    ``FARCALL_*`` may be set; a bad value is pydantic's ``ValidationError``);
    :meth:`from_env` reads the environment, and a bad value there raises
    :class:`SettingsError` (a ``ValueError``) with one line per variable, named.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True,
                                      allow_inf_nan=False, extra="forbid")

    redis_url: str | None = None
    amqp_url: str | None = None
    redis_prefix: str = "farcall:"
    queue_prefix: str = "farcall."
    max_payload_bytes: int = Field(default=10 * MB, ge=1)
    result_ttl: int = Field(default=7 * 24 * 3600, ge=1)
    endpoint_timeout: float = Field(default=30.0, gt=0)
    """Offline after this silence, for an endpoint that did not say its heartbeat period."""
    max_endpoint_losses: int = Field(default=3, ge=1)
    """A task running at this many deaths of its endpoint's agent fails instead of going again."""
    rate_limit: float = Field(default=500.0, ge=0)
    """Requests per second one user may make, on average, all their tokens together (REST calls,
    batches submitted on a result stream, and their timers' runs); 0 for no limit. Each broker
    replica counts on its own."""
    rate_burst: int = Field(default=2000, ge=0)
    """Requests one user may make at once before ``rate_limit`` applies."""
    auth_failure_rate: float = Field(default=1.0, ge=0)
    """Failed authentications per second one client address may make, on average (0: no limit)."""
    auth_failure_burst: int = Field(default=30, ge=0)
    """Failed authentications one address may make at once before it is answered 429."""
    max_endpoints: int = Field(default=100, ge=0)
    """Endpoints one user may own (0: no limit)."""
    max_functions: int = Field(default=50_000, ge=0)
    """Functions one user may have registered (0: no limit)."""
    max_open_tasks: int = Field(default=1_000_000, ge=0)
    """Tasks one user may have waiting or running (0: no limit); past it, submissions answer 429."""
    max_tokens: int = Field(default=100, ge=0)
    """Tokens one user may hold (0: no limit); past it, creating one answers 403."""
    max_timers: int = Field(default=1000, ge=0)
    """Timers one user may have, in any state (0: no limit); past it, creating one answers 403."""
    max_task_bytes: int = Field(default=1024 * MB, ge=INLINE_BYTES)
    """Largest arguments or result of one task (they travel as data-plane blobs past
    ``inline_bytes``); at least ``INLINE_BYTES``, the size up to which they travel inside it."""
    requeue_after: float = Field(default=10.0, gt=0)
    """Seconds a recorded batch may wait for its queue's confirmation (or a timer's claimed run
    for its task) before a replica's sweep takes it over: its broker died in between, or the
    queue was down. Longer than a queue publish ever takes; short enough not to keep tasks."""
    body_timeout: float = Field(default=30.0, gt=0)
    """Seconds a request body may send nothing before the broker drops the request (408) and
    frees what it held of it: a stalled upload or post cannot pin the broker's memory."""
    max_uploads_per_user: int = Field(default=8, ge=0)
    """Blob uploads one user may have in progress at once, on each replica (0: no limit); also
    the number of large JSON bodies one token (or address) may be sending at once. Past it,
    429 with Retry-After."""
    max_blob_bytes_per_user: int = Field(default=10 * 1024 * MB, ge=0)
    """Bytes of blobs one user may keep stored (0: no limit): a blob counts against its owner
    (the uploading user, or for a worker's upload the task's submitter) until it expires or
    is freed (an argument blob when its task ends). Past it, uploads answer 403
    ``quota_exceeded``."""
    user_endpoint_start_seconds: float = Field(default=START_RESEND_SECONDS, gt=0)
    """Seconds the broker waits for a user endpoint it asked a multi-user endpoint's manager to
    start before asking again (while tasks wait for it and it has not connected)."""
    blob_dir: str | None = None
    """Keep blobs as files in this directory (shared by every replica, e.g. an NFS or volume
    mount) instead of in Redis (or in memory, embedded)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values passed in: the environment is read by :meth:`from_env`, on purpose."""
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings that ``environ`` (the process's environment by default) gives; an empty
        variable counts as unset."""
        values = _Environment(cls, os.environ if environ is None else environ)()
        try:
            return cls(**values)
        except ValidationError as e:
            raise SettingsError(_explain(e)) from None

    @field_validator("redis_url", "amqp_url", "blob_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def max_frame_bytes(self) -> int:
        """Largest WebSocket message accepted: a results frame may carry several max-size payloads."""
        return max(64 * 1024 * 1024, 4 * self.max_payload_bytes)

    @property
    def embedded(self) -> bool:
        """True when neither Redis nor RabbitMQ is configured (in-process store and queue)."""
        return self.redis_url is None and self.amqp_url is None


class _Environment(EnvSettingsSource):
    """pydantic-settings' reading of ``FARCALL_*`` variables, from a given mapping rather than
    always ``os.environ`` (so a test or a caller can say which environment it means)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        """Names folded to lower case as pydantic-settings does (``case_sensitive`` is off), empty
        values left out (``env_ignore_empty``)."""
        return {name.lower(): value for name, value in self._environ.items()
                if value != "" or not self.env_ignore_empty}


_NOT_A_NUMBER = {"int_parsing": "a whole number", "int_from_float": "a whole number",
                 "float_parsing": "a number", "finite_number": "a finite number"}


def _explain(error: ValidationError) -> str:
    """One line per bad setting, named as its environment variable, with what to give instead."""
    return "\n".join(_line(e) for e in error.errors(include_url=False))


def _line(e: Mapping[str, Any]) -> str:
    field = str(e["loc"][0]) if e["loc"] else ""
    name = f"{ENV_PREFIX}{field.upper()}"
    value, ctx = e.get("input"), e.get("ctx") or {}
    kind = e["type"]
    if kind in _NOT_A_NUMBER:
        return f"{name}={value!r} is not {_NOT_A_NUMBER[kind]}; unset it or give one"
    if kind == "greater_than_equal":
        why = (", the size up to which arguments travel inside the task"
               if field == "max_task_bytes" else "")
        return f"{name}={value} is below {_number(ctx['ge'])}{why}; set it to at least that"
    if kind == "greater_than":
        return f"{name}={value} must be more than {_number(ctx['gt'])}"
    return f"{name}={value!r}: {e['msg']}"


def _number(limit: float) -> float:
    """``0`` rather than ``0.0`` in a message about an integer-valued limit."""
    return int(limit) if float(limit).is_integer() else limit
