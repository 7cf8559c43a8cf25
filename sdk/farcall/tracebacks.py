"""A remote traceback as plain data, and rebuilt from it as a real traceback the submitter's
tools format with the user's source lines.

Each frame keeps what formatting needs: its file name, function name, line, and the line its
function starts on, which tools that show a frame with its surrounding lines (IPython, for a
cell whose file is not on disk) count from. The data is the dict ``tblib``'s
``Traceback.to_dict`` makes, plus ``co_firstlineno``, so farcall versions that read it with
tblib still do, and its dicts read here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

_PAD = 1000
"""Spaces inside the parentheses of a rebuilt frame's ``raise``: its position then spans any
source line shorter than that, so formatters draw no carets under a part of the user's line
that had nothing to do with the error (the original columns do not travel)."""


class _Rebuilt(Exception):
    """Raised by a rebuilt frame to make it; never leaves this module."""


def traceback_doc(tb: TracebackType | None) -> dict[str, Any] | None:
    """``tb`` as nested dicts of strings and ints, outermost frame first (``None`` for none)."""
    levels: list[dict[str, Any]] = []
    while tb is not None:
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        named = {key: frame.f_globals[key] for key in ("__file__", "__name__")
                 if isinstance(frame.f_globals.get(key), str)}
        levels.append({
            "tb_frame": {
                "f_globals": named, "f_locals": {}, "f_lineno": frame.f_lineno,
                "f_code": {"co_filename": code.co_filename, "co_name": code.co_name,
                           "co_firstlineno": code.co_firstlineno},
            },
            "tb_lineno": tb.tb_lineno if tb.tb_lineno is not None else code.co_firstlineno,
            "tb_next": None,
        })
        tb = tb.tb_next
    for outer, inner in zip(levels, levels[1:], strict=False):
        outer["tb_next"] = inner
    return levels[0] if levels else None


def rebuild_traceback(doc: Mapping[str, Any] | None) -> TracebackType | None:
    """A traceback whose frames name the remote files, functions and lines of ``doc``
    (what :func:`traceback_doc` or tblib made): ``traceback``, IPython and debuggers show the
    lines from this machine's ``linecache``, where the user's script or cells are."""
    head: TracebackType | None = None
    tail: TracebackType | None = None
    while doc:
        tb = _frame(doc)
        if tail is None:
            head = tb
        else:
            tail.tb_next = tb
        tail = tb
        doc = doc.get("tb_next")
    return head


def _frame(level: Mapping[str, Any]) -> TracebackType:
    """One frame raising at the remote line: a ``raise`` compiled on that line of a code object
    that starts where the remote function did, under its file and function name."""
    frame = level["tb_frame"]
    code = frame["f_code"]
    line = max(int(level["tb_lineno"]), 1)
    first = int(code.get("co_firstlineno") or line)
    if not 1 <= first <= line:
        first = line
    stub = "\n" * (line - first) + "raise _Rebuilt(" + " " * _PAD + ")"
    name = str(code["co_name"])
    compiled = compile(stub, "<farcall>", "exec").replace(
        co_filename=str(code["co_filename"]), co_name=name, co_qualname=name,
        co_firstlineno=first)
    namespace = {**frame.get("f_globals", {}), "_Rebuilt": _Rebuilt}
    try:
        exec(compiled, namespace)
    except _Rebuilt as e:
        assert e.__traceback__ is not None and e.__traceback__.tb_next is not None
        return e.__traceback__.tb_next  # the stub's frame, not this function's
    raise AssertionError("a rebuilt frame's stub always raises")
