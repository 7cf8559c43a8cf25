"""Errors raised by the endpoint agent, each with a message that says what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

from farcall.errors import ConfigurationError, FarcallError, MaxResultSizeExceeded

if TYPE_CHECKING:
    from pydantic import ValidationError

    from farcall.endpoint.problems import Problem


class EndpointError(FarcallError):
    """Base class of the endpoint's own errors."""


class EndpointConfigError(ConfigurationError, EndpointError):
    """The endpoint's configuration is missing, malformed or has a bad value.

    The message names the file and the key at fault.
    """


class RegistrationError(EndpointError):
    """The broker refused to register this endpoint, or could not be reached."""


class EndpointRejected(EndpointError):
    """The broker refused the endpoint credential (deleted endpoint or revoked credential)."""


class ProtocolError(EndpointError):
    """The broker sent something the protocol does not allow: the agent reconnects, or fails
    the one task concerned (a task whose function body never came)."""


class ResultTooLarge(EndpointError, MaxResultSizeExceeded):
    """A task's result is bigger than the broker takes (``FARCALL_MAX_TASK_BYTES``), or than
    any frame it reads; the task fails with this (its message names the size and the limit),
    the worker and the endpoint carry on."""


class WorkerLost(EndpointError):
    """The worker process running a task died before the task finished.

    The task's own code may have crashed the interpreter (a segfault, ``os._exit``,
    running out of memory) or the worker was killed from outside.
    """


def validation_problems(
    error: ValidationError, prefix: str = "", valid_keys: list[str] | None = None
) -> list[Problem]:
    """One :class:`~farcall.endpoint.problems.Problem` per bad key of a pydantic error:
    ``engine.max_workers: Input should be greater than 0 (got 0)``; an unknown key lists the
    valid ones."""
    from farcall.endpoint.problems import Problem

    found = []
    for item in error.errors():
        key = prefix + ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            valid = f" (valid keys: {', '.join(valid_keys)})" if valid_keys else ""
            found.append(Problem(key, f"unknown key{valid}"))
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            found.append(Problem(key, f"{message} (got {item.get('input')!r})"))
    return found


def format_validation_error(
    error: ValidationError, prefix: str = "", valid_keys: list[str] | None = None
) -> str:
    """One part per bad key: ``engine.max_workers: Input should be greater than 0 (got 0)``.

    Config errors use it so they name every key at fault and, for an unknown key, the valid ones.
    """
    return "; ".join(str(p) for p in validation_problems(error, prefix, valid_keys))
