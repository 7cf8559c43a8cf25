"""A function keeps its file and lines on the way to a worker: for every function strategy, a
function of a user's script (its ``__main__``, so it travels by value) runs and fails in another
process, and the exception rebuilt here formats with the script's file, lines and source."""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import pytest

from farcall.serialize import (
    FUNCTION_CLOUDPICKLE,
    FUNCTION_DILL,
    FUNCTION_SOURCE,
    payload_strategy,
    rebuild_exception,
    serialize_function,
)

SCRIPT = '''\
"""A user's script."""
import math


def boom(tag):
    """Fails on purpose."""
    raise ValueError(f"boom-{tag}")


class Scaler:
    def scale(self, x):
        return math.sqrt(x)


def through_a_method(x):
    scaler = Scaler()
    via = lambda v: scaler.scale(v)  # noqa: E731
    return via(x)


def nested(x):
    def inner(v):
        return 1 / v
    return inner(x)
'''
BOOM_LINE = 7
"""The line of ``raise ValueError`` in ``SCRIPT`` (``boom`` starts on line 5)."""

WORKER = """
import json, sys
from farcall.serialize import deserialize_function, serialize_exception

failures = []
for payload, args in json.load(sys.stdin):
    try:
        deserialize_function(payload)(*args)
    except Exception as e:
        data, text = serialize_exception(e.with_traceback(e.__traceback__.tb_next))
        failures.append([data, text])
json.dump(failures, sys.stdout)
"""
"""A worker's part: each function loaded and called, its failure serialized as the worker does
(without the worker's own frame)."""

STRATEGIES = {"cloudpickle": FUNCTION_CLOUDPICKLE, "dill": FUNCTION_DILL, "source": FUNCTION_SOURCE}


@pytest.fixture
def script(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The script's file and its ``__main__`` namespace, as ``python analysis.py`` makes them."""
    path = tmp_path / "analysis.py"
    path.write_text(SCRIPT)
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(path)}
    exec(compile(SCRIPT, str(path), "exec"), namespace)
    return path, namespace


def run_elsewhere(calls: list[tuple[str, tuple[Any, ...]]], cwd: Path) -> list[tuple[str, str]]:
    """``(data, text)`` of each failing call, run in a new Python process."""
    done = subprocess.run([sys.executable, "-c", WORKER], input=json.dumps(calls), cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [(data, text) for data, text in json.loads(done.stdout)]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_remote_frame_shows_the_scripts_file_line_and_source(
        strategy: str, script: tuple[Path, dict[str, Any]]) -> None:
    path, namespace = script
    payload = serialize_function(namespace["boom"], strategy)
    assert payload_strategy(payload) == STRATEGIES[strategy]
    [(data, text)] = run_elsewhere([(payload, ("remote",))], path.parent)
    rebuilt = rebuild_exception(data, text, "t1")
    assert isinstance(rebuilt, ValueError), text
    formatted = "".join(traceback.format_exception(rebuilt))
    # The frame, its source line, and no carets under a part of the line the error is not about.
    assert formatted.endswith(f'  File "{path}", line {BOOM_LINE}, in boom\n'
                              '    raise ValueError(f"boom-{tag}")\n'
                              "ValueError: boom-remote\n"), formatted
    assert rebuilt.__traceback__ is not None
    code = rebuilt.__traceback__.tb_frame.f_code
    assert code.co_firstlineno == 5, "IPython shows a cell's frame counting from its def line"


@pytest.mark.parametrize("strategy", ["cloudpickle", "dill"])
def test_a_method_and_a_lambda_the_task_calls_keep_their_lines(
        strategy: str, script: tuple[Path, dict[str, Any]]) -> None:
    path, namespace = script
    [(data, text)] = run_elsewhere(
        [(serialize_function(namespace["through_a_method"], strategy), (-1,))], path.parent)
    formatted = "".join(traceback.format_exception(rebuild_exception(data, text)))
    assert (f'  File "{path}", line 18, in through_a_method\n    return via(x)\n'
            f'  File "{path}", line 17, in <lambda>\n    via = lambda v: scaler.scale(v)'
            f'  # noqa: E731\n'
            f'  File "{path}", line 12, in scale\n    return math.sqrt(x)\n'
            "ValueError: math domain error\n") in formatted, formatted


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_nested_function_keeps_its_lines(strategy: str,
                                           script: tuple[Path, dict[str, Any]]) -> None:
    path, namespace = script
    [(data, text)] = run_elsewhere([(serialize_function(namespace["nested"], strategy), (0,))],
                                   path.parent)
    formatted = "".join(traceback.format_exception(rebuild_exception(data, text)))
    assert (f'  File "{path}", line 24, in nested\n    return inner(x)\n'
            f'  File "{path}", line 23, in inner\n    return 1 / v\n') in formatted, formatted


def test_source_sent_to_a_worker_shows_in_its_own_traceback_text(
        script: tuple[Path, dict[str, Any]]) -> None:
    """Where the user's file is not (another machine), the worker's text (``ResultMessage.error``)
    still shows the lines of the source it was sent, of every function from that file."""
    path, namespace = script
    calls = [(serialize_function(namespace[name], "source"), args)
             for name, args in (("boom", ("text",)), ("nested", (0,)))]
    path.unlink()
    (_, boom), (_, nested) = run_elsewhere(calls, path.parent)
    assert (f'File "{path}", line {BOOM_LINE}, in boom\n'
            '    raise ValueError(f"boom-{tag}")\n') in boom, boom
    assert f'File "{path}", line 23, in inner\n    return 1 / v\n' in nested, nested


def test_source_from_an_older_farcall_still_loads() -> None:
    """A ``02`` payload made before the file and line travelled: compiled under a made-up name."""
    from farcall.serialize import _wrap, deserialize_function

    doc = {"name": "double", "source": "def double(x):\n    return 2 * x\n"}
    fn = deserialize_function(_wrap(FUNCTION_SOURCE, json.dumps(doc).encode()))
    assert fn(21) == 42 and fn.__code__.co_filename == "<farcall source of double>"


def test_a_code_object_marshal_cannot_write_still_travels() -> None:
    """Code built by hand around a constant that only pickle can write (as some libraries
    build it) goes in cloudpickle's own form, without its file name."""
    import marshal
    import pickle
    from fractions import Fraction

    from farcall.sourcelines import cloudpickle_dumps

    def third() -> object:
        return "placeholder"

    code = third.__code__
    consts = tuple(Fraction(1, 3) if c == "placeholder" else c for c in code.co_consts)
    built = types.FunctionType(code.replace(co_consts=consts), {})
    assert built() == Fraction(1, 3)
    with pytest.raises(ValueError, match="unmarshallable"):
        marshal.dumps(built.__code__)
    assert pickle.loads(cloudpickle_dumps(built))() == Fraction(1, 3)
