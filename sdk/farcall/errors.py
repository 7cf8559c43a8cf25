"""Every error the SDK raises, each with a message that says what to do."""

from __future__ import annotations

import numbers
import types
from typing import Any


class FarcallError(Exception):
    """Base class of all farcall errors."""


ComputeError = FarcallError
"""Globus Compute's name for the base class of its errors."""


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
    """``Client.get_result`` was asked for a task that has not finished yet.

    ``reason`` is its state, as Globus Compute's ``TaskPending.reason`` names it."""

    def __init__(self, task_id: str, state: str) -> None:
        super().__init__(f"task {task_id} is not finished yet (state: {state}); ask again later")
        self.task_id = task_id
        self.state = state

    @property
    def reason(self) -> str:
        return self.state

    def __reduce__(self) -> Any:
        return type(self), (self.task_id, self.state)


class SerializationError(FarcallError):
    """An object could not be serialized or a payload could not be loaded.

    Also importable as ``SerdeError``, Globus Compute's base of both directions."""

    @property
    def reason(self) -> str:
        """The message (Globus Compute's attribute name)."""
        return str(self)


SerdeError = SerializationError


class DeserializationError(SerializationError):
    """A payload could not be loaded on the other side.

    The message names both sides' Python and dill versions, because a mismatch
    between them is the usual cause.
    """


class TaskExecutionFailed(FarcallError):
    """A task failed remotely.

    Every exception a task raised is re-raised here as an instance of its own class *and* of
    this one (:func:`as_task_failure`), so ``except ValueError`` and Globus Compute's
    ``except TaskExecutionFailed`` both catch it. Raised as itself when the remote exception
    could not be rebuilt here. ``remote_traceback`` (also ``remote_data``, Globus Compute's
    name) is the traceback text from the worker.
    """

    remote_traceback: str = ""
    task_id: str = ""
    completion_t: float | None = None
    """When the task finished (seconds since the epoch), where known."""

    def __init__(self, message: str, remote_traceback: str = "", task_id: str = "") -> None:
        super().__init__(message if not remote_traceback else f"{message}\n\n{remote_traceback}")
        self.remote_traceback = remote_traceback
        self.task_id = task_id

    @property
    def remote_data(self) -> str:
        """The remote traceback text (Globus Compute's attribute name)."""
        return self.remote_traceback

    def reraise(self) -> None:
        """Raise this exception (what older Globus Compute programs call on ``task['exception']``)."""
        raise self


_REMOTE_FIELDS = ("remote_traceback", "task_id", "completion_t")
_FAILURE_CLASSES: dict[type[BaseException], type[BaseException] | None] = {}


def as_task_failure(exc: BaseException, remote_traceback: str = "", task_id: str = ""
                    ) -> BaseException:
    """``exc`` as an instance of its own class and of :class:`TaskExecutionFailed`.

    The copy keeps the arguments, attributes, traceback, cause, context and notes, and
    formats, compares by name, pickles and unpickles as the original class does. An exception
    that is not an ``Exception`` (``SystemExit``...) or whose class cannot take a second base is
    returned as it is.
    """
    cls = type(exc)
    if isinstance(exc, TaskExecutionFailed) or not isinstance(exc, Exception):
        return exc
    if cls not in _FAILURE_CLASSES:
        _FAILURE_CLASSES[cls] = _failure_class(cls)
    both = _FAILURE_CLASSES[cls]
    if both is None:
        return exc
    try:
        copy = both.__new__(both, *exc.args)
        _copy_builtin_fields(exc, copy)
        copy.__dict__.update(exc.__dict__)
    except Exception:  # noqa: BLE001 - an odd __new__: keep the original, it still carries all
        return exc
    copy.args = exc.args
    copy.__traceback__ = exc.__traceback__
    copy.__cause__, copy.__context__ = exc.__cause__, exc.__context__
    copy.__suppress_context__ = exc.__suppress_context__
    for name, value in zip(_REMOTE_FIELDS, (remote_traceback, task_id, None), strict=True):
        if name not in copy.__dict__:
            try:
                setattr(copy, name, value)
            except AttributeError:  # the class has a read-only property of that name: keep it
                pass
    return copy


def _copy_builtin_fields(exc: BaseException, copy: BaseException) -> None:
    """The fields built-in exception classes keep outside ``args`` and ``__dict__``
    (``OSError.filename``, ``StopIteration.value``, ``UnicodeError.start``...)."""
    for klass in type(exc).__mro__:
        if klass.__module__ != "builtins" or klass in (BaseException, object):
            continue
        for name, field in vars(klass).items():
            if name.startswith("__") or not isinstance(
                    field, types.MemberDescriptorType | types.GetSetDescriptorType):
                continue
            try:
                value = getattr(exc, name)
                if value is not None:  # None is what the copy has: setting it may show it
                    setattr(copy, name, value)
            except (AttributeError, TypeError):  # unset, or read-only: nothing to carry
                pass


def _failure_class(cls: type[BaseException]) -> type[BaseException] | None:
    def __reduce__(self: BaseException) -> Any:  # noqa: N807 - pickled as the original class
        reduced = cls.__reduce__(self)
        if not isinstance(reduced, tuple) or reduced[0] is not type(self):
            return reduced
        state = reduced[2] if len(reduced) > 2 else None
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k not in _REMOTE_FIELDS} or None
        return (cls, reduced[1], state) if state else (cls, reduced[1])

    try:
        return type(cls.__name__, (cls, TaskExecutionFailed), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__reduce__": __reduce__, "__str__": cls.__str__, "__repr__": cls.__repr__,
            "__init__": cls.__init__})
    except TypeError:  # a layout conflict (a C type with slots of its own): leave it as it is
        return None


class MaxResultSizeExceeded(FarcallError, ValueError):
    """A task's result was bigger than the broker takes; the task failed with this (the
    endpoint's ``ResultTooLarge`` is one). The message names the size and the limit."""


class VersionMismatch(FarcallError):
    """This SDK and the broker (or an endpoint) are of releases that cannot work together.

    ``version_message`` (Globus Compute's attribute) is the message, which names both versions
    and what to install."""

    def __init__(self, version_message: str) -> None:
        super().__init__(version_message)
        self.version_message = version_message


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


class CompatibilityWarning(UserWarning):
    """An argument a Globus Compute program passes that farcall accepts but has no use for; the
    message says what farcall does instead. Given once per process for each argument."""


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
