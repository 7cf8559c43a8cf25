"""Errors raised by the endpoint agent, each with a message that says what to do."""

from __future__ import annotations

from farcall.errors import ConfigurationError, FarcallError


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


class WorkerLost(EndpointError):
    """The worker process running a task died before the task finished.

    The task's own code may have crashed the interpreter (a segfault, ``os._exit``,
    running out of memory) or the worker was killed from outside.
    """
