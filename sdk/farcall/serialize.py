"""Turning functions, arguments, results and exceptions into payload strings.

A payload is text: a strategy code, a newline, then the strategy's body. The
broker stores and forwards payloads without reading them. Strategies:

``01``  function by value with dill (``__main__``/notebook functions, closures, lambdas)
``02``  function as source text, re-executed on the worker (fallback when dill fails)
``10``  any object with dill (arguments, results)
``11``  plain data with the standard pickle: tried first for arguments and results, since
        it is 10-60x faster than dill; anything defined in ``__main__`` or that pickle
        cannot handle (lambdas, closures) goes to ``10`` instead
``12``  plain JSON (UTF-8): what a flow engine can write and read, so the arguments and
        results of tasks run through the Action Provider API (``result_format="json"``)
``20``  a remote exception with its traceback (dill + tblib)
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import pickle
import textwrap
import traceback
import types
from collections.abc import Callable
from typing import Any

import dill
from tblib import Traceback

from farcall.errors import DeserializationError, SerializationError
from farcall.version import __version__

FUNCTION_DILL = "01"
FUNCTION_SOURCE = "02"
DATA_DILL = "10"
DATA_PICKLE = "11"
DATA_JSON = "12"
EXCEPTION = "20"

STRATEGIES = {"dill": FUNCTION_DILL, "source": FUNCTION_SOURCE}


def _wrap(code: str, body: bytes) -> str:
    return code + "\n" + base64.b64encode(body).decode("ascii")


def _unwrap(payload: str) -> tuple[str, bytes]:
    code, sep, body = payload.partition("\n")
    if not sep or len(code) != 2:
        raise DeserializationError(
            "payload has no farcall header; it was not made by farcall.serialize"
        )
    try:
        return code, base64.b64decode(body, validate=True)
    except ValueError as e:
        raise DeserializationError(f"payload body is not valid base64: {e}") from e


def payload_strategy(payload: str) -> str:
    """The strategy code at the head of a payload."""
    return payload.partition("\n")[0]


# ------------------------------------------------------------------- functions


def serialize_function(fn: Callable[..., Any], strategy: str = "auto") -> str:
    """Serialize ``fn`` so a worker can run it.

    ``strategy`` is ``"dill"``, ``"source"`` or ``"auto"`` (dill, falling back
    to source text when dill cannot pickle or reload the function).
    """
    if not callable(fn):
        raise SerializationError(f"expected a function, got {type(fn).__name__}")
    if strategy not in ("auto", *STRATEGIES):
        raise SerializationError(
            f"unknown function strategy {strategy!r}; use 'auto', 'dill' or 'source'"
        )
    errors: list[str] = []
    if strategy in ("auto", "dill"):
        try:
            body = dill.dumps(fn, recurse=True)
            dill.loads(body)
            return _wrap(FUNCTION_DILL, body)
        except Exception as e:  # noqa: BLE001 - any pickling failure moves on to source
            errors.append(f"dill: {type(e).__name__}: {e}")
    if strategy in ("auto", "source"):
        try:
            source = textwrap.dedent(inspect.getsource(fn))
            doc = {"name": fn.__name__, "source": source}
            return _wrap(FUNCTION_SOURCE, json.dumps(doc).encode())
        except (OSError, TypeError) as e:
            errors.append(f"source: {type(e).__name__}: {e}")
    raise SerializationError(
        f"cannot serialize function {getattr(fn, '__qualname__', fn)!r} ("
        + "; ".join(errors)
        + "). Define it at the top level of your script or notebook and make every "
        "object it uses picklable."
    )


def deserialize_function(payload: str) -> Callable[..., Any]:
    code, body = _unwrap(payload)
    if code == FUNCTION_DILL:
        fn = dill.loads(body)
    elif code == FUNCTION_SOURCE:
        doc = json.loads(body)
        namespace: dict[str, Any] = {"__name__": "__farcall_source__"}
        exec(compile(doc["source"], f"<farcall source of {doc['name']}>", "exec"), namespace)
        fn = namespace[doc["name"]]
    else:
        raise DeserializationError(f"payload strategy {code!r} is not a function strategy")
    if not callable(fn):
        raise DeserializationError(f"function payload holds a {type(fn).__name__}, not a function")
    return fn


# ------------------------------------------------------------------------ data


class _ByValueNeeded(Exception):
    """The object refers to something only this interpreter has; dill must copy it by value."""


class _PlainPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        module = getattr(obj if isinstance(obj, (type, types.FunctionType)) else type(obj),
                         "__module__", None)
        if module == "__main__":
            raise _ByValueNeeded
        return NotImplemented


def _plain_pickle(obj: Any) -> bytes | None:
    buffer = io.BytesIO()
    try:
        _PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception:  # noqa: BLE001 - anything pickle cannot do, dill may
        return None
    return buffer.getvalue()


def serialize(obj: Any) -> str:
    """Serialize any picklable object (arguments, results)."""
    plain = _plain_pickle(obj)
    if plain is not None:
        return _wrap(DATA_PICKLE, plain)
    try:
        return _wrap(DATA_DILL, dill.dumps(obj))
    except Exception as e:  # noqa: BLE001
        raise SerializationError(
            f"cannot serialize {type(obj).__name__}: {type(e).__name__}: {e}. "
            "Pass only picklable arguments and return only picklable results."
        ) from e


def serialize_json(obj: Any) -> str:
    """``obj`` as a JSON payload (strategy ``12``); ``SerializationError`` for anything that is
    not plain JSON (NaN and infinities included, which JSON has no words for)."""
    try:
        text = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        raise SerializationError(
            f"cannot serialize {type(obj).__name__} as JSON: {e}. Use only dicts with string "
            "keys, lists, strings, numbers, booleans and None.") from e
    return _wrap(DATA_JSON, text.encode("utf-8"))


def deserialize_json(payload: str) -> Any:
    """The value of a JSON payload (strategy ``12``) without unpickling anything: safe on data
    from anyone. ``DeserializationError`` for a payload of any other strategy."""
    code, body = _unwrap(payload)
    if code != DATA_JSON:
        raise DeserializationError(
            f"payload strategy {code!r} is not JSON (strategy {DATA_JSON!r}); it was not made with "
            "result_format 'json'")
    return _json_value(body)


def _json_value(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError as e:
        raise DeserializationError(f"JSON payload does not hold valid UTF-8 JSON: {e}") from e


def deserialize(payload: str) -> Any:
    code, body = _unwrap(payload)
    if code == DATA_PICKLE:
        return pickle.loads(body)
    if code == DATA_DILL:
        return dill.loads(body)
    if code == DATA_JSON:
        return _json_value(body)
    if code in (FUNCTION_DILL, FUNCTION_SOURCE, EXCEPTION):
        raise DeserializationError(f"payload strategy {code!r} is not a data strategy")
    raise DeserializationError(
        f"payload strategy {code!r} is unknown to farcall {__version__}: the other side runs a "
        "newer farcall; use the same farcall version on both sides"
    )


def pack_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return serialize((tuple(args), dict(kwargs)))


def pack_json_args(args: list[Any], kwargs: dict[str, Any]) -> str:
    """Arguments that are plain JSON as a strategy ``12`` payload ``[args, kwargs]``: how the
    Action Provider API passes a flow's arguments (``unpack_args`` reads every strategy)."""
    return serialize_json([list(args), dict(kwargs)])


def unpack_args(payload: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = deserialize(payload)
    return tuple(args), dict(kwargs)


# ------------------------------------------------------------------ exceptions


def serialize_exception(exc: BaseException) -> tuple[str, str]:
    """``(data, text)`` for a remote exception.

    ``text`` is the formatted traceback, always available. ``data`` rebuilds the
    exception with its traceback on the caller's side; it is empty when the
    exception itself cannot be pickled.
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb = Traceback(exc.__traceback__).to_dict() if exc.__traceback__ else None
    try:
        data = _wrap(EXCEPTION, dill.dumps((exc, tb)))
        dill.loads(dill.dumps(exc))
    except Exception:  # noqa: BLE001 - an unpicklable exception still reports its text
        data = ""
    return data, text


def rebuild_exception(data: str, text: str, task_id: str = "") -> BaseException:
    """The remote exception with its remote traceback attached, or ``TaskExecutionFailed``."""
    from farcall.errors import TaskExecutionFailed

    if data:
        try:
            code, body = _unwrap(data)
            if code == EXCEPTION:
                exc, tb = dill.loads(body)
                if isinstance(exc, BaseException):
                    if tb is not None:
                        exc = exc.with_traceback(Traceback.from_dict(tb).as_traceback())
                    elif text:
                        exc.add_note(f"Remote traceback (task {task_id}):\n{text}".rstrip())
                    return exc
        except Exception:  # noqa: BLE001 - fall through to the text form
            pass
    first = text.strip().splitlines()[-1] if text.strip() else "task failed remotely"
    return TaskExecutionFailed(first, remote_traceback=text, task_id=task_id)
