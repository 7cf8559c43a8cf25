"""Every error the SDK raises, each with a message that says what to do."""

from __future__ import annotations

import numbers
from typing import Any


class FarcallError(Exception):
    """Base class of all farcall errors."""


class ConfigurationError(FarcallError):
    """The SDK or a component is missing a setting (broker URL, token, ...)."""


class InvalidSetting(ConfigurationError, ValueError):
    """A setting (an argument or an environment variable) has a value farcall cannot use; the
    message names it and what it takes."""


class CertificateError(ConfigurationError):
    """The broker's TLS certificate is not trusted here (unknown CA, or a host name mismatch).

    Not retried: waiting does not make a certificate trusted. The message gives
    OpenSSL's reason and names ``FARCALL_CA_BUNDLE`` / ``SSL_CERT_FILE``.
    """


class BrokerError(FarcallError):
    """The broker answered a request with an error.

    ``status`` is the HTTP status, ``error`` the broker's error code and ``body``
    the JSON body it sent.
    """

    def __init__(self, status: int, message: str, error: str = "", body: Any = None) -> None:
        super().__init__(f"broker answered {status}: {message}")
        self.status = status
        self.message = message
        self.error = error
        self.body = body

    def __reduce__(self) -> Any:
        """Pickled with what it was made of (a worker sends it back as a task's exception)."""
        return type(self), (self.status, self.message, self.error, self.body)


class AuthenticationError(BrokerError):
    """The token was missing, unknown or revoked (HTTP 401)."""


class NotFound(BrokerError):
    """The object does not exist, or is not yours (HTTP 404)."""


class PermissionDenied(BrokerError):
    """The broker refused a request you may not make (HTTP 403).

    On an endpoint or function shared with you, only its owner may change, share
    or delete it; ``error`` ``"quota_exceeded"`` means you hold as many endpoints or
    functions as the broker allows: delete some, or ask its operator for more.
    """


class RateLimited(BrokerError):
    """The broker kept answering 429 for longer than the client's ``retry_seconds``.

    ``error`` is ``"rate_limited"`` (too many requests with this token) or
    ``"quota_exceeded"`` (too many unfinished tasks); ``retry_after`` is the
    seconds the broker last asked to wait (None if it did not say).
    """

    def __init__(
        self, status: int, message: str, error: str = "", body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, message, error, body)
        self.retry_after = retry_after

    def __reduce__(self) -> Any:
        return type(self), (self.status, self.message, self.error, self.body, self.retry_after)


class DataExpired(NotFound):
    """A task's big argument or result (a data-plane blob) is gone from the broker: it lives as
    long as the task's result (``FARCALL_RESULT_TTL``), then expires with it (HTTP 404)."""


class TaskTooLarge(FarcallError, ValueError):
    """A task's arguments are bigger than the broker takes (``Limits.max_task_bytes``).

    Only that task fails; ``size`` and ``limit`` are in bytes. The message says to
    pass less data or to raise ``FARCALL_MAX_TASK_BYTES`` on the broker.
    """

    def __init__(self, message: str, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit

    def __reduce__(self) -> Any:
        return type(self), (str(self), self.size, self.limit)


class TaskPending(FarcallError):
    """``Client.get_result`` was asked for a task that has not finished yet."""

    def __init__(self, task_id: str, state: str) -> None:
        super().__init__(f"task {task_id} is not finished yet (state: {state}); ask again later")
        self.task_id = task_id
        self.state = state


class SerializationError(FarcallError):
    """An object could not be serialized or a payload could not be loaded."""


class DeserializationError(SerializationError):
    """A payload could not be loaded on the other side.

    The message names both sides' Python and dill versions, because a mismatch
    between them is the usual cause.
    """


class TaskExecutionFailed(FarcallError):
    """A task failed remotely and its exception could not be rebuilt here.

    ``remote_traceback`` holds the traceback text from the worker.
    """

    def __init__(self, message: str, remote_traceback: str = "", task_id: str = "") -> None:
        super().__init__(message if not remote_traceback else f"{message}\n\n{remote_traceback}")
        self.remote_traceback = remote_traceback
        self.task_id = task_id


class TaskTimeout(FarcallError, TimeoutError):
    """A task ran past its ``walltime`` on the worker and was stopped."""


class FunctionNotAllowed(FarcallError):
    """The endpoint refuses to run this function (not in its ``allowed_functions``)."""


class ExecutorShutdown(FarcallError, RuntimeError):
    """``submit`` was called after ``shutdown``."""


class ShellCommandError(FarcallError, ValueError):
    """A ``ShellFunction``'s command line cannot be made: a bad template, or a ``{placeholder}``
    without a keyword argument (the message names it)."""


class MPIEnvironmentError(FarcallError, RuntimeError):
    """An ``MPIFunction`` ran where no MPI launcher prefix (``$PARSL_MPI_PREFIX``) is given:
    run it on an ``MPIEngine`` endpoint with a ``resource_specification``."""


class IdentityMappingError(FarcallError):
    """A multi-user endpoint could not map the submitting user to a local account (no rule of its
    identity mapping matched, or the name it gave has no Unix account there): the task never ran.
    The message names the user and what the endpoint's administrator must add."""


class UserEndpointError(FarcallError):
    """A multi-user endpoint could not start the submitter's user endpoint for a reason other
    than identity mapping: its configuration template refused the ``user_endpoint_config`` (the
    message says which value and why), or the user endpoint failed to start. The task never ran."""


def broker_error(status: int, message: str, error: str = "", body: Any = None,
                 retry_after: float | None = None) -> BrokerError:
    """The SDK exception for a broker error answer (HTTP status and JSON body)."""
    if status == 429:
        if retry_after is None and isinstance(body, dict):
            retry_after = seconds_or_none(body.get("retry_after"))
        return RateLimited(status, message, error, body, retry_after)
    kind = {401: AuthenticationError, 403: PermissionDenied, 404: NotFound}.get(status, BrokerError)
    return kind(status, message, error, body)


def seconds_or_none(value: Any) -> float | None:
    """A non-negative finite number of seconds, or None for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    seconds = float(value)
    return seconds if 0 <= seconds < float("inf") else None
