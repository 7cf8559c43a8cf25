"""A traceback as data and back: the rebuilt frames name the same files, functions and lines,
count from the same first lines, and read tblib's form both ways (older farcall versions)."""

from __future__ import annotations

import inspect
import pickle
import traceback
from types import TracebackType

from tblib import Traceback

from farcall.tracebacks import rebuild_traceback, traceback_doc


def _outer(x: int) -> float:
    """Two frames of this file, the failing line three lines below the def."""
    y = x - 1
    z = y + 1
    return _inner(z)


def _inner(v: int) -> float:
    return 1 / v


def _failure() -> TracebackType:
    try:
        _outer(0)
    except ZeroDivisionError as e:
        assert e.__traceback__ is not None and e.__traceback__.tb_next is not None
        return e.__traceback__.tb_next  # from _outer on
    raise AssertionError("_outer(0) must fail")


def _frames(tb: TracebackType | None) -> list[tuple[str, str, int, int]]:
    found = []
    while tb is not None:
        code = tb.tb_frame.f_code
        found.append((code.co_filename, code.co_name, tb.tb_lineno, code.co_firstlineno))
        tb = tb.tb_next
    return found


def test_a_rebuilt_traceback_has_the_original_files_names_and_lines() -> None:
    original = _failure()
    doc = traceback_doc(original)
    rebuilt = rebuild_traceback(pickle.loads(pickle.dumps(doc)))
    assert _frames(rebuilt) == _frames(original)
    assert [(f.filename, f.name, f.line) for f in traceback.extract_tb(rebuilt)] == [
        (__file__, "_outer", "return _inner(z)"), (__file__, "_inner", "return 1 / v")]


def test_a_rebuilt_frame_shows_its_function_from_the_def_line() -> None:
    """What IPython shows for a frame whose file is not on disk (a cell): the function's lines
    from ``inspect.getsourcelines(frame)``, the current one counted from ``co_firstlineno``."""
    rebuilt = rebuild_traceback(traceback_doc(_failure()))
    assert rebuilt is not None
    lines, first = inspect.getsourcelines(rebuilt.tb_frame)
    assert (lines, first) == inspect.getsourcelines(_outer)
    assert lines[rebuilt.tb_lineno - first].strip() == "return _inner(z)"


def test_no_carets_point_into_the_users_line() -> None:
    """Columns do not travel: a rebuilt frame draws none rather than wrong ones."""
    rebuilt = rebuild_traceback(traceback_doc(_failure()))
    text = "".join(traceback.format_exception(ZeroDivisionError, ZeroDivisionError("x"), rebuilt))
    assert "^" not in text and "    return 1 / v\nZeroDivisionError: x" in text


def test_tblib_reads_this_form_and_this_reads_tblibs() -> None:
    original = _failure()
    theirs = Traceback.from_dict(traceback_doc(original)).as_traceback()
    assert [f[:3] for f in _frames(theirs)] == [f[:3] for f in _frames(original)]
    ours = rebuild_traceback(Traceback(original).to_dict())
    assert [f[:3] for f in _frames(ours)] == [f[:3] for f in _frames(original)]


def test_no_traceback_is_none() -> None:
    assert traceback_doc(None) is None and rebuild_traceback(None) is None
