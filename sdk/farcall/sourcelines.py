"""A function keeps its file name and line numbers when it travels to a worker.

The submitter formats a remote traceback with its own ``linecache``, where the user's script
or IPython's cells are; so a remote frame shows the user's source line as long as it names the
original file and line. cloudpickle 3 writes ``"<dynamic-code>"`` into every code object it
pickles by value, and a function sent as source text is compiled under a made-up name from line
1: both lose that. Here a code object is pickled whole, and sent source is compiled where it
came from. Both happen once per function, never per task.
"""

from __future__ import annotations

import ast
import inspect
import io
import linecache
import marshal
import os
import pickle
import textwrap
import types
from collections import ChainMap
from collections.abc import Callable
from typing import Any, TypedDict

import cloudpickle


def _code_whole(code: types.CodeType) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A code object as the compiler made it (file name, lines, nested code objects): the
    format of ``.pyc`` files, loaded by ``marshal`` itself, so a pickle needs no farcall to load
    it. Like cloudpickle's own form, it loads only on the same Python version."""
    try:
        return marshal.loads, (marshal.dumps(code),)
    except ValueError:  # built by hand around a constant marshal cannot write: cloudpickle's form
        return _CLOUDPICKLE_CODE(code)


_CLOUDPICKLE_CODE = cloudpickle.Pickler.dispatch_table[types.CodeType]


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that code objects keep their file name (every function, lambda and
    method it pickles by value: a notebook's, and those they call)."""

    dispatch_table = ChainMap({types.CodeType: _code_whole}, cloudpickle.Pickler.dispatch_table)


def cloudpickle_dumps(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None
                      ) -> bytes:
    """``cloudpickle.dumps`` (highest protocol) whose functions keep their file and lines; the
    result loads with the standard ``pickle.loads``."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buffer.getvalue()


class Source(TypedDict, total=False):
    """A function as source text (the body of a ``02`` payload). ``file`` and ``line`` (where
    ``source`` starts there) are absent from the payloads of older farcall versions."""

    name: str
    source: str
    file: str
    line: int


def source_of(fn: Callable[..., Any]) -> Source:
    """``fn``'s source (dedented, decorators included) and where it is; ``OSError`` or
    ``TypeError`` when there is none (a builtin, a function typed into a plain REPL)."""
    lines, first = inspect.getsourcelines(fn)
    code = getattr(fn, "__code__", None)
    file = code.co_filename if code is not None else inspect.getsourcefile(fn)
    doc = Source(name=fn.__name__, source=textwrap.dedent("".join(lines)), line=max(first, 1))
    if file:
        doc["file"] = file
    return doc


def compile_source(doc: Source) -> types.CodeType:
    """The code of a module holding ``doc``'s source, on its original lines of its original
    file; this process's own traceback text shows those lines too, where the file is absent."""
    file = doc.get("file") or f"<farcall source of {doc['name']}>"
    line = doc.get("line", 1)
    tree = ast.parse(doc["source"], file)
    ast.increment_lineno(tree, line - 1)
    if not file.startswith("<"):
        _remember(file, line, doc["source"])
    return compile(tree, file, "exec")


_sent: dict[str, list[str]] = {}
"""Lines of files this process knows only from sources it was sent, by file name."""


def _remember(file: str, line: int, source: str) -> None:
    """Put the sent lines into ``linecache`` under their file's name (with blank lines around
    them), unless the file is on disk here: ``linecache`` reads real files itself, and an entry
    without an mtime, as IPython makes for its cells, is never dropped as stale."""
    if os.path.exists(file):
        return
    lines = _sent.setdefault(file, [])
    new = [text if text.endswith("\n") else text + "\n" for text in source.splitlines()]
    end = line - 1 + len(new)
    lines.extend("\n" for _ in range(end - len(lines)))
    lines[line - 1:end] = new
    linecache.cache[file] = (sum(map(len, lines)), None, lines, file)
