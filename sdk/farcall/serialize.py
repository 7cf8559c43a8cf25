"""Turning functions, arguments, results and exceptions into payload strings.

A payload is text: a strategy code, a newline, then the strategy's body. The
broker stores and forwards payloads without reading them. Strategies:

``01``  function by value with dill ``recurse=True`` (fallback when cloudpickle fails)
``02``  function as source text, re-executed on the worker (fallback when both fail)
``03``  function by value with cloudpickle (``__main__``/notebook functions, closures, lambdas)
``10``  any object with dill ``recurse=True`` (fallback for what cloudpickle cannot: locks, ...)
``11``  plain data with the standard pickle: tried first for arguments and results, since
        it is 30-50x faster than dill; anything defined in ``__main__`` or that pickle
        cannot handle (lambdas, closures) goes to ``13``, then ``10``
``13``  any object with cloudpickle (arguments, results): classes, instances and functions of
        ``__main__`` by value with the globals their methods use; buffers out of band
``12``  plain JSON (UTF-8): what a flow engine can write and read, so the arguments and
        results of tasks run through the Action Provider API (``result_format="json"``)
``20``  a remote exception with its traceback (dill; the traceback as ``tracebacks`` data)
``30``  a reference to a data-plane blob (JSON ``{"blob_id", "size"}``, not base64): arguments
        or a result bigger than ``INLINE_BYTES``, held by the broker's blob store and fetched
        on demand; the blob is ``Frames.blob_parts`` (pickle protocol 5, buffers out of band)

Why cloudpickle before dill: ``python -m bench.serialization_coverage`` defines 23 notebook
cases (docs/architecture.md, "Serialization") in one ``__main__`` and loads them in another.
cloudpickle carried 22, dill ``recurse=True`` 19 (it fails enums of ``__main__`` and nested
recursive functions, and keeps numpy buffers in band), dill's default 10 (methods lose the
notebook's globals: ``NameError``), and cloudpickle pickled 2,000 notebook objects 7x faster.
dill stays as the fallback for the one case only it carries (an object holding a lock).

Every function strategy keeps the function's file name and line numbers (``sourcelines``), so a
remote traceback shows the user's source lines where it is formatted.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import pickle
import struct
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dill

from farcall.errors import DeserializationError, SerializationError
from farcall.sourcelines import cloudpickle_dumps, compile_source, source_of
from farcall.tracebacks import rebuild_traceback, traceback_doc
from farcall.version import __version__

FUNCTION_DILL = "01"
FUNCTION_SOURCE = "02"
FUNCTION_CLOUDPICKLE = "03"
DATA_DILL = "10"
DATA_PICKLE = "11"
DATA_JSON = "12"
DATA_CLOUDPICKLE = "13"
EXCEPTION = "20"
BLOB_REF = "30"

INLINE_BYTES = 256 * 1024
"""Arguments and results up to this size travel inside the task (base64 in JSON, batched);
larger ones go through the data plane as binary blobs. Measured on one 2-core machine, a blob
costs as much as inline from about 150 KB up, and is 4x faster at 1 MB."""

STRATEGIES = {"cloudpickle": FUNCTION_CLOUDPICKLE, "dill": FUNCTION_DILL, "source": FUNCTION_SOURCE}
"""Function strategies by name, in the order ``"auto"`` tries them."""

BufferCallback = Callable[[pickle.PickleBuffer], Any]


def _cloudpickle(obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
    return cloudpickle_dumps(obj, buffer_callback)


def _dill(obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
    """``recurse=True``: a function carries the globals it uses, not a reference to ``__main__``
    (dill ignores ``buffer_callback``: its buffers stay in band)."""
    return dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)


_LOADS: dict[str, Callable[..., Any]] = {
    FUNCTION_CLOUDPICKLE: pickle.loads, FUNCTION_DILL: dill.loads,
    DATA_PICKLE: pickle.loads, DATA_CLOUDPICKLE: pickle.loads, DATA_DILL: dill.loads}
"""The reader of each pickled strategy (a cloudpickle payload is a standard pickle)."""


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

    ``strategy`` is ``"cloudpickle"``, ``"dill"``, ``"source"`` or ``"auto"`` (each in that
    order, moving on when one cannot pickle or reload the function).
    """
    if not callable(fn):
        raise SerializationError(f"expected a function, got {type(fn).__name__}")
    if strategy not in ("auto", *STRATEGIES):
        raise SerializationError(
            f"unknown function strategy {strategy!r}; use 'auto', 'cloudpickle', 'dill' or 'source'"
        )
    errors: list[str] = []
    for name, code, dump in (("cloudpickle", FUNCTION_CLOUDPICKLE, _cloudpickle),
                             ("dill", FUNCTION_DILL, _dill)):
        if strategy not in ("auto", name):
            continue
        try:
            body = dump(fn)
            _LOADS[code](body)
            return _wrap(code, body)
        except Exception as e:  # noqa: BLE001 - any pickling failure moves on to the next
            errors.append(f"{name}: {type(e).__name__}: {e}")
    if strategy in ("auto", "source"):
        try:
            return _wrap(FUNCTION_SOURCE, json.dumps(source_of(fn)).encode())
        except (OSError, TypeError) as e:
            errors.append(f"source: {type(e).__name__}: {e}")
    raise SerializationError(
        f"cannot serialize function {getattr(fn, '__qualname__', fn)!r} ("
        + "; ".join(errors)
        + "). Define it at the top level of your script or notebook and make every "
        "object it uses picklable."
    )


def serialize_source(source: str, name: str) -> str:
    """A function payload made of Python ``source`` text that defines function ``name``; the
    worker runs the text as a module and calls ``name``. ``SerializationError`` if it does not
    parse or defines no such function."""
    try:
        tree = ast.parse(source, f"<farcall source of {name}>")
    except SyntaxError as e:
        raise SerializationError(f"the source of {name!r} does not parse: {e}") from None
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    if name not in defined:
        raise SerializationError(
            f"the source defines no top-level function {name!r} (it defines: "
            f"{', '.join(sorted(defined)) or 'none'}); pass the name of the function to call")
    return _wrap(FUNCTION_SOURCE, json.dumps({"name": name, "source": source, "line": 1}).encode())


def deserialize_function(payload: str) -> Callable[..., Any]:
    code, body = _unwrap(payload)
    if code in (FUNCTION_CLOUDPICKLE, FUNCTION_DILL):
        fn = _LOADS[code](body)
    elif code == FUNCTION_SOURCE:
        doc = json.loads(body)
        namespace: dict[str, Any] = {"__name__": "__farcall_source__"}
        exec(compile_source(doc), namespace)
        fn = namespace[doc["name"]]
    else:
        raise DeserializationError(f"payload strategy {code!r} is not a function strategy")
    if not callable(fn):
        raise DeserializationError(f"function payload holds a {type(fn).__name__}, not a function")
    return fn


# ------------------------------------------------------------------------ data


class _ByValueNeeded(Exception):
    """The object refers to something only this interpreter has; it must be copied by value."""


class _PlainPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        module = getattr(obj if isinstance(obj, (type, types.FunctionType)) else type(obj),
                         "__module__", None)
        if module == "__main__":
            raise _ByValueNeeded
        return NotImplemented


def _plain_pickle(obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
    buffer = io.BytesIO()
    _PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buffer.getvalue()


_DATA_PICKLERS: tuple[tuple[str, str, Callable[[Any, BufferCallback | None], bytes]], ...] = (
    (DATA_PICKLE, "pickle", _plain_pickle),
    (DATA_CLOUDPICKLE, "cloudpickle", _cloudpickle),
    (DATA_DILL, "dill", _dill),
)
"""What ``dumps`` tries, in order (the order measured by bench/serialization_coverage.py)."""


def dumps(obj: Any, buffer_callback: BufferCallback | None = None) -> tuple[str, bytes]:
    """``(strategy code, body)`` for any picklable object: the standard pickle for plain data,
    cloudpickle for anything else, dill for what cloudpickle cannot. With ``buffer_callback``
    (pickle protocol 5), each contiguous buffer (numpy arrays, bytearrays) of the returned body
    is passed to it, in order, and kept out of the body; a library that fails half way passes
    none."""
    errors: list[str] = []
    for code, name, dump in _DATA_PICKLERS:
        held: list[pickle.PickleBuffer] = []
        try:
            body = dump(obj, _holder(held) if buffer_callback else None)
        except Exception as e:  # noqa: BLE001 - anything one library cannot do, the next may
            if code != DATA_PICKLE:
                errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if buffer_callback is not None:
            for buffer in held:
                buffer_callback(buffer)
        return code, body
    raise SerializationError(
        f"cannot serialize {type(obj).__name__} ({'; '.join(errors)}). "
        "Pass only picklable arguments and return only picklable results."
    )


def _holder(held: list[pickle.PickleBuffer]) -> BufferCallback:
    """A buffer callback that keeps contiguous buffers out of band in ``held`` (others in band)."""
    def hold(buffer: pickle.PickleBuffer) -> bool:
        try:
            buffer.raw()
        except BufferError:
            return True
        held.append(buffer)
        return False

    return hold


def loads(code: str, body: bytes | memoryview, buffers: Sequence[Any] = ()) -> Any:
    """The object ``dumps`` made (``buffers``: its out-of-band buffers, in order)."""
    if code in (DATA_PICKLE, DATA_CLOUDPICKLE, DATA_DILL):
        return _LOADS[code](body, buffers=buffers)
    if code == DATA_JSON:
        return _json_value(bytes(body))
    if code in (FUNCTION_CLOUDPICKLE, FUNCTION_DILL, FUNCTION_SOURCE, EXCEPTION):
        raise DeserializationError(f"payload strategy {code!r} is not a data strategy")
    raise DeserializationError(
        f"payload strategy {code!r} is unknown to farcall {__version__}: the other side runs a "
        "newer farcall; use the same farcall version on both sides"
    )


def serialize(obj: Any) -> str:
    """Serialize any picklable object (arguments, results) as an inline payload."""
    return _wrap(*dumps(obj))


# ------------------------------------------------------- frames (the data plane)


@dataclass(eq=False)
class Frames:
    """An object pickled with its large buffers kept out of band (pickle protocol 5), so a
    numpy array travels without being copied into the pickle: what the data plane sends."""

    code: str
    main: bytes
    buffers: list[memoryview]

    @property
    def nbytes(self) -> int:
        """Bytes of the blob ``blob_parts`` makes (the size the limits apply to)."""
        return _FRAME_HEAD.size + 8 * (len(self.buffers) + 1) + len(self.main) + sum(
            b.nbytes for b in self.buffers)

    def payload(self) -> str:
        """The inline payload of the same object (for small ones; buffers copied in)."""
        if not self.buffers:
            return _wrap(self.code, self.main)
        return _wrap(self.code, _dumps_in_band(self.code, self.main, self.buffers))

    def blob_parts(self) -> list[memoryview]:
        """The blob, as parts to send one after the other without joining them: a header
        (magic, strategy code, buffer count, every length), the pickle, then each buffer."""
        lengths = [len(self.main), *(b.nbytes for b in self.buffers)]
        head = _FRAME_HEAD.pack(FRAME_MAGIC, self.code.encode("ascii"), len(self.buffers))
        head += struct.pack(f"<{len(lengths)}Q", *lengths)
        return [memoryview(head), memoryview(self.main), *self.buffers]


FRAME_MAGIC = b"FCF1"
_FRAME_HEAD = struct.Struct("<4s2sI")


def pack(obj: Any) -> Frames:
    """``obj`` pickled once with its large buffers out of band; ``Frames.nbytes`` says which
    way it travels (inline payload or data-plane blob)."""
    buffers: list[memoryview] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(buffer.raw())
        except BufferError:  # not contiguous: let pickle copy it in band
            return True
        return False

    code, main = dumps(obj, buffer_callback=keep)
    return Frames(code, main, buffers)


def unpack_blob(blob: bytes | bytearray | memoryview) -> Any:
    """The object in a blob ``Frames.blob_parts`` made. Buffers are views into ``blob``
    (no copy): a numpy array comes back backed by it, writable when ``blob`` is."""
    view = memoryview(blob)
    if view.nbytes < _FRAME_HEAD.size or bytes(view[:4]) != FRAME_MAGIC:
        raise DeserializationError("data-plane blob has no farcall frame header; it was not "
                                   "made by farcall.serialize.Frames")
    _, code, count = _FRAME_HEAD.unpack_from(view)
    at = _FRAME_HEAD.size
    lengths = struct.unpack_from(f"<{count + 1}Q", view, at)
    at += 8 * (count + 1)
    if at + sum(lengths) != view.nbytes:
        raise DeserializationError(
            f"data-plane blob is {view.nbytes} bytes but its header says {at + sum(lengths)}: "
            "it was cut short or corrupted on the way; run the task again")
    parts = []
    for n in lengths:
        parts.append(view[at:at + n])
        at += n
    return loads(code.decode("ascii"), parts[0], parts[1:])


def ref_payload(blob_id: str, size: int) -> str:
    """The payload (strategy ``30``) that stands for a blob in a task's arguments or result."""
    return BLOB_REF + "\n" + json.dumps({"blob_id": blob_id, "size": size})


def is_ref(payload: str) -> bool:
    return payload.startswith(BLOB_REF + "\n")


def parse_ref(payload: str) -> tuple[str, int]:
    """``(blob_id, size)`` of a reference payload; ``DeserializationError`` if it is not one."""
    code, _, body = payload.partition("\n")
    try:
        doc = json.loads(body) if code == BLOB_REF else None
        if isinstance(doc, dict) and isinstance(doc.get("blob_id"), str) and isinstance(
                doc.get("size"), int):
            return doc["blob_id"], doc["size"]
    except ValueError:
        pass
    raise DeserializationError("payload is not a data-plane reference (strategy '30' with "
                               '{"blob_id", "size"})')


def _dumps_in_band(code: str, main: bytes, buffers: list[memoryview]) -> bytes:
    dump = next(dump for made_by, _, dump in _DATA_PICKLERS if made_by == code)
    return dump(loads(code, main, buffers), None)


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
    return loads(*_unwrap(payload))


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
    tb = traceback_doc(exc.__traceback__)
    try:
        data = _wrap(EXCEPTION, dill.dumps((exc, tb)))
        dill.loads(dill.dumps(exc))
    except Exception:  # noqa: BLE001 - an unpicklable exception still reports its text
        data = ""
    return data, text


def rebuild_exception(data: str, text: str, task_id: str = "") -> BaseException:
    """The remote exception with its remote traceback attached, also an instance of
    ``TaskExecutionFailed`` (``errors.as_task_failure``); ``TaskExecutionFailed`` itself when it
    cannot be rebuilt."""
    from farcall.errors import TaskExecutionFailed, as_task_failure

    if data:
        try:
            code, body = _unwrap(data)
            if code == EXCEPTION:
                exc, tb = dill.loads(body)
                if isinstance(exc, BaseException):
                    if tb is not None:
                        exc = exc.with_traceback(rebuild_traceback(tb))
                    elif text:
                        exc.add_note(f"Remote traceback (task {task_id}):\n{text}".rstrip())
                    return as_task_failure(exc, text, task_id)
        except Exception:  # noqa: BLE001 - fall through to the text form
            pass
    first = text.strip().splitlines()[-1] if text.strip() else "task failed remotely"
    return TaskExecutionFailed(first, remote_traceback=text, task_id=task_id)


def __getattr__(name: str) -> Any:
    """Globus Compute's strategy names (``ComputeSerializer``, ``DillCode``...), found where a
    program's changed ``from globus_compute_sdk.serialize import ...`` looks for them."""
    from farcall import strategies

    if name in strategies.NAMES:
        return getattr(strategies, name)
    raise AttributeError(f"module 'farcall.serialize' has no attribute {name!r}")
