"""What a notebook sends, as cases: defined in one ``__main__``, loaded in another that lacks them.

The notebook user's situation is that the code which made an object (cells run in the kernel's
``__main__``) is absent where the object is loaded (a worker). Each :class:`Case` is written the
way a user writes cells; :func:`round_trip` runs every case's cells as the ``__main__`` of one
subprocess, serializes each case's value there with a chosen library, and loads it in a second
subprocess whose ``__main__`` holds none of those definitions, then calls the case's probe on it.

Shared by ``python -m bench.serialization_coverage`` (every library side by side, with timings),
``tests/sdk/test_serialize.py`` (farcall's own choice) and ``tests/integration/test_notebook.py``
(the same cells in a real Jupyter kernel).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import REPO


@dataclass(frozen=True)
class Case:
    """One thing a notebook sends. ``cells`` are run in ``__main__`` in order (after every case's
    ``imports``); ``value`` is the expression there that makes the object; ``probe`` is an
    expression of ``v`` (the loaded object) whose JSON value must equal ``expected``. With
    ``call``, the value is a function and the probe is ``v(*call)``, so it can also be submitted
    as the task's function. ``out_of_band``: its large buffers should travel out of band."""

    name: str
    title: str
    cells: tuple[str, ...]
    value: str
    expected: Any
    probe: str = ""
    call: tuple[Any, ...] | None = None
    imports: tuple[str, ...] = ()
    out_of_band: bool = False

    @property
    def expression(self) -> str:
        """The probe as an expression of ``v``."""
        return self.probe or f"v(*{self.call!r})"

    @property
    def want(self) -> Any:
        """``expected`` as it reads after a JSON round trip (tuples become lists)."""
        return json.loads(json.dumps(self.expected))


CASES: tuple[Case, ...] = (
    Case("plain_data", "plain data (dicts, lists, tuples, sets)",
         (), '{"a": [1, 2.5, "x"], "b": (None, True), "c": {3}}', [[1, 2.5, "x"], True, [3]],
         probe='[v["a"], v["b"][1], sorted(v["c"])]'),
    Case("instance_uses_module", "instance of a __main__ class whose method uses a module imported "
         "in another cell (the NameError bug)",
         ("class Angle:\n    def __init__(self, radians):\n        self.radians = radians\n\n"
          "    def sine(self):\n        return round(math.sin(self.radians), 6)\n",),
         "Angle(math.pi / 2)", 1.0, probe="v.sine()", imports=("import math",)),
    Case("instance_uses_constant", "instance whose method uses a constant defined in another cell",
         ("FACTOR = 2.5\n",
          "class Scaled:\n    def __init__(self, x):\n        self.x = x\n\n"
          "    def value(self):\n        return self.x * FACTOR\n"),
         "Scaled(4)", 10.0, probe="v.value()"),
    Case("instance_uses_helper", "instance whose method calls a helper function of another cell",
         ("def twice(x):\n    return 2 * x\n",
          "class Wrapped:\n    def __init__(self, x):\n        self.x = x\n\n"
          "    def doubled(self):\n        return twice(self.x)\n"),
         "Wrapped(21)", 42, probe="v.doubled()"),
    Case("main_class", "a __main__ class itself (made and used remotely)",
         ("class Circle:\n    def __init__(self, r):\n        self.r = r\n\n"
          "    def area(self):\n        return round(math.pi * self.r ** 2, 3)\n",),
         "Circle", 12.566, probe="v(2).area()", imports=("import math",)),
    Case("subclass_super", "a subclass calling super() (both classes in __main__)",
         ("class Base:\n    def hello(self):\n        return 'base'\n",
          "class Child(Base):\n    def hello(self):\n        return 'child+' + super().hello()\n"),
         "Child()", "child+base", probe="v.hello()"),
    Case("properties", "property, classmethod and staticmethod",
         ("class Temperature:\n    def __init__(self, celsius):\n        self.celsius = celsius\n\n"
          "    @property\n    def fahrenheit(self):\n        return self.celsius * 9 / 5 + 32\n\n"
          "    @classmethod\n    def freezing(cls):\n        return cls(Temperature.zero())\n\n"
          "    @staticmethod\n    def zero():\n        return 0.0\n",),
         "Temperature(100.0)", [212.0, 32.0], probe="[v.fahrenheit, type(v).freezing().fahrenheit]"),
    Case("function_uses_module", "function using a module imported in another cell",
         ("def hypotenuse(a, b):\n    return math.hypot(a, b)\n",),
         "hypotenuse", 5.0, call=(3, 4), imports=("import math",)),
    Case("function_uses_table", "function reading a dict defined in another cell",
         ("UNITS = {'km': 1000, 'm': 1}\n", "def to_metres(n, unit):\n    return n * UNITS[unit]\n"),
         "to_metres", 2000, call=(2, "km")),
    Case("nested_function", "nested function (closure over an argument)",
         ("def make_adder(n):\n    def add(x):\n        return x + n\n    return add\n",),
         "make_adder(10)", 15, call=(5,)),
    Case("recursive_function", "recursive function",
         ("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",),
         "fib", 55, call=(10,)),
    Case("nested_recursive", "nested recursive function",
         ("def make_fact():\n    def fact(n):\n        return 1 if n <= 1 else n * fact(n - 1)\n"
          "    return fact\n",),
         "make_fact()", 120, call=(5,)),
    Case("closure_state", "closure holding mutable state",
         ("def make_counter():\n    count = [0]\n\n    def bump():\n        count[0] += 1\n"
          "        return count[0]\n    return bump\n",),
         "make_counter()", 1, call=()),
    Case("lambda", "lambda using a constant of another cell",
         ("OFFSET = 7\n", "shift = lambda x: x + OFFSET\n"), "shift", 8, call=(1,)),
    Case("partial", "functools.partial of a __main__ function",
         ("def power(base, exponent):\n    return base ** exponent\n",),
         "functools.partial(power, exponent=3)", 8, call=(2,), imports=("import functools",)),
    Case("decorated", "function wrapped by a decorator defined in __main__",
         ("def tagged(fn):\n    @functools.wraps(fn)\n    def wrapper(*args):\n"
          "        return ['tagged', fn(*args)]\n    return wrapper\n",
          "@tagged\ndef square(x):\n    return x * x\n"),
         "square", ["tagged", 16], call=(4,), imports=("import functools",)),
    Case("generator_results", "function returning a generator's results",
         ("def countdown(n):\n    while n > 0:\n        yield n\n        n -= 1\n",
          "def collect(n):\n    return list(countdown(n)) + [sum(i * i for i in range(n))]\n"),
         "collect", [3, 2, 1, 5], call=(3,)),
    Case("dataclass", "dataclass defined in __main__",
         ("@dataclasses.dataclass\nclass Point:\n    x: int\n    y: int\n\n"
          "    def norm1(self):\n        return abs(self.x) + abs(self.y)\n",),
         "Point(3, -4)", [7, "Point(x=3, y=-4)"], probe="[v.norm1(), repr(v)]",
         imports=("import dataclasses",)),
    Case("enum", "enum defined in __main__",
         ("class Color(enum.Enum):\n    RED = 1\n    GREEN = 2\n\n"
          "    def label(self):\n        return self.name.lower()\n",),
         "Color.GREEN", ["green", 2, True], probe="[v.label(), v.value, v is type(v).GREEN]",
         imports=("import enum",)),
    Case("cycle", "objects referencing each other (a cycle)",
         ("class Node:\n    def __init__(self, name):\n        self.name = name\n        self.peer = None\n",
          "left, right = Node('left'), Node('right')\nleft.peer, right.peer = right, left\n"),
         "left", ["right", True], probe="[v.peer.name, v.peer.peer is v]"),
    Case("numpy_array", "numpy array (buffers out of band)",
         (), "np.arange(100_000)", [4999950000, "int64"], probe="[int(v.sum()), str(v.dtype)]",
         imports=("import numpy as np",), out_of_band=True),
    Case("main_object_with_array", "__main__ object holding an array, method using numpy",
         ("class Grid:\n    def __init__(self, n):\n        self.cells = np.ones((n, n))\n\n"
          "    def total(self):\n        return float(np.sum(self.cells))\n",),
         "Grid(300)", 90000.0, probe="v.total()", imports=("import numpy as np",), out_of_band=True),
    Case("holds_lock", "object holding a threading.Lock",
         ("class Guarded:\n    def __init__(self):\n        self.lock = threading.Lock()\n"
          "        self.n = 3\n",),
         "Guarded()", [3, True], probe="[v.n, v.lock.acquire(blocking=False)]",
         imports=("import threading",)),
)
"""Every case; their cells may all run in one ``__main__`` (names do not clash), as in a notebook."""

SPEED_CASES: tuple[Case, ...] = (
    Case("speed_plain", "plain data: 20,000 records of floats and strings",
         (), "[{'id': i, 'x': i * 0.5, 'name': f'n{i}'} for i in range(20_000)]", 20_000,
         probe="len(v)"),
    Case("speed_main", "__main__-heavy: 2,000 instances of a notebook class with a method using math",
         ("class Sample:\n    def __init__(self, i):\n        self.i = i\n        self.x = i * 0.5\n\n"
          "    def root(self):\n        return math.sqrt(self.x)\n",),
         "[Sample(i) for i in range(2_000)]", 2_000, probe="len(v) if v[2].root() == 1.0 else -1",
         imports=("import math",)),
)
"""Cases timed by the benchmark (dumps in the maker, loads in the loader: best of several)."""


def script(cases: Sequence[Case]) -> str:
    """The cases' imports then cells, as one ``__main__`` source (a notebook run top to bottom)."""
    imports = sorted({line for case in cases for line in case.imports})
    cells = [cell for case in cases for cell in case.cells]
    return "\n".join(imports) + "\n\n" + "\n\n".join(cells)


# --------------------------------------------------------------- libraries

Dump = Callable[[Any, Callable[[pickle.PickleBuffer], Any]], bytes]
Load = Callable[[bytes, Sequence[Any]], Any]


def _library(name: str) -> tuple[Dump, Load]:
    """``(dumps(obj, buffer_callback), loads(body, buffers))`` of a library setting; imported here
    so neither the maker's nor the loader's ``__main__`` gains a name from it."""
    if name == "pickle":
        return (lambda o, cb: pickle.dumps(o, protocol=5, buffer_callback=cb),
                lambda b, bufs: pickle.loads(b, buffers=bufs))
    if name.startswith("dill"):
        import dill

        options = {"dill": {}, "dill recurse=True": {"recurse": True},
                   "dill byref=True": {"byref": True}}[name]
        return (lambda o, cb: dill.dumps(o, protocol=5, buffer_callback=cb, **options),
                lambda b, bufs: dill.loads(b, buffers=bufs))
    if name == "cloudpickle":
        import cloudpickle

        return (lambda o, cb: cloudpickle.dumps(o, protocol=5, buffer_callback=cb),
                lambda b, bufs: pickle.loads(b, buffers=bufs))
    if name == "farcall":
        from farcall import serialize

        def dump(o: Any, cb: Callable[[pickle.PickleBuffer], Any]) -> bytes:
            code, body = serialize.dumps(o, buffer_callback=cb)
            return code.encode() + body

        return dump, lambda b, bufs: serialize.loads(b[:2].decode(), b[2:], bufs)
    if name == "farcall function":
        from farcall import serialize

        return (lambda o, cb: serialize.serialize_function(o).encode(),
                lambda b, bufs: serialize.deserialize_function(b.decode()))
    raise ValueError(f"unknown library {name!r}; use one of {', '.join(LIBRARIES)}")


LIBRARIES = ("pickle", "dill", "dill recurse=True", "dill byref=True", "cloudpickle", "farcall",
             "farcall function")
"""Library settings :func:`round_trip` knows; ``farcall function`` applies only to cases with ``call``."""


def applies(library: str, case: Case) -> bool:
    return library != "farcall function" or case.call is not None


# ------------------------------------------------------------ the two sides


@dataclass
class Outcome:
    """One case with one library: ``status`` is ``pass``, ``in band`` (loaded right, but its
    buffers were copied into the pickle) or ``FAIL``; ``error`` says why; timings in seconds."""

    status: str
    error: str = ""
    code: str = ""
    dump_s: float = 0.0
    load_s: float = 0.0


def dump_cases(library: str, names: Sequence[str], out: str, repeat: int = 1) -> None:
    """Maker side (runs at the end of the maker's ``__main__``): serialize each case's value there."""
    import __main__

    dump, _ = _library(library)
    made: dict[str, dict[str, Any]] = {}
    for name in names:
        case = _BY_NAME[name]
        try:
            obj = eval(case.value, vars(__main__))
            best = float("inf")
            for _ in range(repeat):
                buffers: list[pickle.PickleBuffer] = []
                start = time.perf_counter()
                body = dump(obj, buffers.append)
                best = min(best, time.perf_counter() - start)
            made[name] = {"body": body, "buffers": [bytes(b.raw()) for b in buffers], "dump_s": best}
        except Exception as e:  # noqa: BLE001 - a library's failure is the measurement
            made[name] = {"error": f"dumps: {type(e).__name__}: {e}"[:300]}
    Path(out).write_bytes(pickle.dumps(made))


def load_cases(library: str, path: str, repeat: int = 1) -> None:
    """Loader side (a ``__main__`` without the cases' definitions): load, probe, print JSON."""
    _, load = _library(library)
    made = pickle.loads(Path(path).read_bytes())
    results: dict[str, dict[str, Any]] = {}
    for name, item in made.items():
        case = _BY_NAME[name]
        if "error" in item:
            results[name] = {"status": "FAIL", "error": item["error"]}
            continue
        try:
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                obj = load(item["body"], item["buffers"])
                best = min(best, time.perf_counter() - start)
            got = json.loads(json.dumps(eval(case.expression, {"v": obj})))
        except Exception as e:  # noqa: BLE001 - a library's failure is the measurement
            results[name] = {"status": "FAIL", "error": f"loads: {type(e).__name__}: {e}"[:300]}
            continue
        status = "pass" if got == case.want else "FAIL"
        if status == "pass" and case.out_of_band and not item["buffers"]:
            status = "in band"
        results[name] = {"status": status, "dump_s": item["dump_s"], "load_s": best,
                         "code": item["body"][:2].decode("latin-1"),
                         "error": "" if status != "FAIL" else f"probe gave {got!r}, not {case.want!r}"}
    print(json.dumps(results))


_BY_NAME = {case.name: case for case in (*CASES, *SPEED_CASES)}


def round_trip(library: str, cases: Sequence[Case] = CASES, repeat: int = 1,
               path_first: Sequence[str] = ()) -> dict[str, Outcome]:
    """Every case of ``cases`` made in one subprocess's ``__main__`` and loaded in another;
    ``path_first``: directories the children import from first (another dill version, say)."""
    cases = [case for case in cases if applies(library, case)]
    names = [case.name for case in cases]
    with tempfile.TemporaryDirectory(prefix="farcall-ser-") as tmp:
        main, out = Path(tmp) / "notebook.py", Path(tmp) / "made.pickle"
        main.write_text(script(cases) + "\n\nfrom harness.serialization_cases import dump_cases as _d\n"
                        f"_d({library!r}, {names!r}, {str(out)!r}, {repeat})\n")
        path = os.pathsep.join([*path_first, str(REPO)])
        _run([sys.executable, str(main)], "maker", path)
        loaded = _run([sys.executable, "-c", "from harness.serialization_cases import load_cases as _l; "
                       f"_l({library!r}, {str(out)!r}, {repeat})"], "loader", path)
    return {name: Outcome(**fields) for name, fields in json.loads(loaded).items()}


def _run(argv: list[str], what: str, path: str) -> str:
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
    if done.returncode != 0:
        raise RuntimeError(f"the {what} subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout
