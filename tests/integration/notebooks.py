"""Notebooks run in a real Jupyter kernel (ipykernel, driven by nbclient), cell by cell as a user
writes them; what a cell wants checked it prints as a JSON report line.

``Notebook().cell(...)`` adds cells; ``.report(tag, expression)`` adds a cell printing the value
of ``expression`` under ``tag``; ``.failing(tag, source)`` adds a cell that must raise;
``.run(kernel)`` executes every cell in a fresh kernel and returns a :class:`Ran` (``{tag: value}``,
the error each failing cell showed, and the progress bars the kernel drew).
``install_kernel`` writes a kernel spec for this interpreter whose environment carries the
broker's URL, a token and an endpoint id (``FARCALL_TEST_ENDPOINT``).

The ``add_*`` functions add a scenario's cells. They expect :func:`start`'s cells first: the
imports, an Executor named ``ex`` and ``outcome(future)`` (``{"value": ...}`` or
``{"error": "Type: message"}``), and each reports under its own tag.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

from harness.serialization_cases import Case

REPORT = "FARCALL-REPORT"
"""The first word of a report line in a cell's output."""
ENDPOINT_VAR = "FARCALL_TEST_ENDPOINT"
"""The kernel's environment variable holding the endpoint id to submit to."""


@dataclass(frozen=True)
class Kernel:
    name: str
    jupyter_path: Path
    """The directory holding ``kernels/<name>/kernel.json`` (what ``JUPYTER_PATH`` points at)."""
    cwd: Path


def install_kernel(root: Path, env: dict[str, str], name: str = "farcall-test") -> Kernel:
    """A kernel spec for this interpreter under ``root`` whose kernels get ``env`` (merged over
    the environment they inherit), as ``python -m ipykernel install --prefix`` would write it."""
    spec = root / "share" / "jupyter" / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (root / "ipython").mkdir(exist_ok=True)
    (root / "work").mkdir(exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python",
        "env": {"IPYTHONDIR": str(root / "ipython"), **env},
    }))
    return Kernel(name, root / "share" / "jupyter", root / "work")


@dataclass(frozen=True)
class Bar:
    """A tqdm notebook widget as the kernel left it: its count, total and right-hand text."""

    value: float
    total: float
    text: str


@dataclass(frozen=True)
class Error:
    """The error output of a cell: what IPython showed the user, colours removed."""

    ename: str
    evalue: str
    traceback: str


@dataclass
class Ran:
    reports: dict[str, Any]
    bars: list[Bar]
    errors: dict[str, Error] = field(default_factory=dict)


@dataclass
class Notebook:
    cells: list[str] = field(default_factory=list)
    failing_cells: dict[int, str] = field(default_factory=dict)
    """Tags of the cells that must raise, by position."""

    def cell(self, source: str) -> Notebook:
        self.cells.append(source.strip("\n"))
        return self

    def failing(self, tag: str, source: str) -> Notebook:
        """A cell that must raise; its error output is ``Ran.errors[tag]`` and the run goes on."""
        self.failing_cells[len(self.cells)] = tag
        return self.cell(source)

    def report(self, tag: str, expression: str) -> Notebook:
        """A cell printing ``expression``'s value (JSON) under ``tag`` for the test to read."""
        return self.cell(f"import json as _json\nprint({REPORT!r}, _json.dumps({{'tag': {tag!r}, "
                         f"'value': {expression}}}))")

    def run(self, kernel: Kernel, timeout: float = 90) -> Ran:
        """Execute every cell in order in a fresh kernel (each cell at most ``timeout`` s). A
        cell that raises fails the run with its traceback, unless added with ``failing``."""
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in self.cells])
        for index in self.failing_cells:
            nb.cells[index].metadata["tags"] = ["raises-exception"]  # nbclient goes on after it
        client = NotebookClient(nb, kernel_name=kernel.name, timeout=int(timeout),
                                resources={"metadata": {"path": str(kernel.cwd)}})
        with _environ(JUPYTER_PATH=str(kernel.jupyter_path)):
            client.execute()
        return Ran(reports(nb), progress_bars(nb), {
            tag: error for index, tag in self.failing_cells.items()
            if (error := error_of(nb.cells[index])) is not None})


def reports(nb: Any) -> dict[str, Any]:
    """``{tag: value}`` of every report line a run notebook printed."""
    found: dict[str, Any] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") != "stream" or output.get("name") != "stdout":
                continue
            for line in output.get("text", "").splitlines():
                if line.startswith(REPORT + " "):
                    doc = json.loads(line[len(REPORT) + 1:])
                    found[doc["tag"]] = doc["value"]
    return found


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def error_of(cell: Any) -> Error | None:
    """The error output of a run cell (``None`` if it raised nothing)."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            text = "\n".join(output.get("traceback", []))
            return Error(output["ename"], output["evalue"], _COLOUR.sub("", text))
    return None


def progress_bars(nb: Any) -> list[Bar]:
    """The tqdm widgets in a run notebook's saved widget state (an HBox of a description, a
    progress model and the counts text), in the order they were made."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    models = state.get("state", {})
    bars = []
    for model in models.values():
        if model["model_name"] != "HBoxModel":
            continue
        children = [models[ref.removeprefix("IPY_MODEL_")]
                    for ref in model["state"].get("children", [])]
        progress = [c["state"] for c in children if c["model_name"].endswith("ProgressModel")]
        texts = [c["state"].get("value", "") for c in children if c["model_name"] == "HTMLModel"]
        if progress and texts:
            bars.append(Bar(progress[0].get("value", 0), progress[0].get("max", 0), texts[-1]))
    return bars


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------ scenarios


def start(nb: Notebook, cases: Sequence[Case] = (), task_group: str | None = None) -> None:
    """The first cells: every import the cases use, the Executor ``ex`` (of ``task_group`` when
    given), and ``outcome(future)``."""
    imports = {line for case in cases for line in case.imports}
    nb.cell("\n".join(sorted(imports | {"import os", "from farcall import Executor"})))
    group = f", task_group_id={task_group!r}" if task_group else ""
    nb.cell(f"ex = Executor(endpoint_id=os.environ[{ENDPOINT_VAR!r}]{group})")
    nb.cell("def outcome(future):\n    try:\n        return {'value': future.result(timeout=60)}\n"
            "    except Exception as e:\n        return {'error': f'{type(e).__name__}: {e}'}")


def add_serialization_cases(nb: Notebook, cases: Sequence[Case], tag: str = "serialization") -> None:
    """Each case's cells as a user writes them, then a cell that submits a probe function with
    the case's value as its ARGUMENT (and, for a function, the value as the task's function);
    reports ``{name: outcome}`` (``name:function`` for the second kind) once all are done."""
    nb.cell("futures = {}")
    for case in cases:
        for source in case.cells:
            nb.cell(source)
        submit = (f"def probe_{case.name}(v):\n    return {case.expression}\n\n\n"
                  f"futures[{case.name!r}] = ex.submit(probe_{case.name}, {case.value})")
        if case.call is not None:
            submit += f"\nfutures['{case.name}:function'] = ex.submit({case.value}, *{case.call!r})"
        nb.cell(submit)
    nb.report(tag, "{name: outcome(f) for name, f in futures.items()}")


def add_big_array(nb: Notebook, megabytes: int = 50, tag: str = "big_array") -> None:
    """A ``megabytes`` MB numpy argument and a result of the same size (the data plane both
    ways); reports the result's size and whether it is the argument doubled."""
    nb.cell(f"import numpy as np\n\nbig = np.arange({megabytes} * 2**20 // 8, dtype=np.float64)")
    nb.cell("def doubled(a):\n    return a * 2")
    nb.cell("back = ex.submit(doubled, big).result(timeout=120)")
    nb.report(tag, "{'nbytes': int(back.nbytes), 'doubled': bool(np.array_equal(back, big * 2))}")


def add_size_error(nb: Notebook, tag: str = "size_error") -> None:
    """One call over the broker's ``max_task_bytes`` between two good ones, submitted together:
    reports the three outcomes. The big array is never written, so it takes no memory."""
    nb.cell("import numpy as np\n\nlimit = ex.client.limits().max_task_bytes\n"
            "too_big = np.zeros(limit + 1, dtype=np.uint8)")
    nb.cell("def total(a):\n    return int(a.sum())")
    nb.cell("mixed = [ex.submit(total, np.ones(10)), ex.submit(total, too_big), "
            "ex.submit(total, np.ones(20))]")
    nb.report(tag, "[outcome(f) for f in mixed]")


def add_progress(nb: Notebook, tag: str = "progress") -> None:
    """``farcall.as_completed(..., progress=True)`` over 8 calls of which one fails, then
    ``ex.map(..., progress=True)`` over 5: two bars (read them from ``Ran.bars``)."""
    nb.cell("import farcall\n\n\ndef not_three(i):\n    if i == 3:\n"
            "        raise ValueError('three')\n    return i")
    nb.cell("watched = [ex.submit(not_three, i) for i in range(8)]\n"
            "finished = sum(1 for _ in farcall.as_completed(watched, timeout=60, progress=True))")
    nb.cell("mapped = list(ex.map(abs, range(-5, 0), timeout=60, progress=True))")
    nb.report(tag, "{'finished': finished, 'mapped': mapped}")


def add_remote_traceback(nb: Notebook, tag: str = "traceback") -> None:
    """A cell defines ``boom`` (it raises ``ValueError`` on its second line), the next submits it
    and catches the error: reports ``traceback.format_exception`` of it and ``boom``'s file
    name; a last cell lets the same error propagate (``Ran.errors[tag]``: IPython's traceback)."""
    nb.cell('def boom(tag):\n    raise ValueError(f"boom-{tag}")')
    nb.cell("import traceback\n\n"
            "try:\n    ex.submit(boom, 'caught').result(timeout=60)\n"
            "except ValueError as e:\n    caught = ''.join(traceback.format_exception(e))")
    nb.report(tag, "{'formatted': caught, 'file': boom.__code__.co_filename}")
    nb.failing(tag, "ex.submit(boom, 'raised').result(timeout=60)")


def add_submit_and_leave(nb: Notebook, seconds: int = 3, tag: str = "left") -> None:
    """Four calls of which the slowest takes ``seconds``; once every call is at the broker and
    the quickest is done, reports the task group id and how many were done (the kernel then
    ends, as on a restart)."""
    nb.cell(f"import time\n\n\ndef slow_square(x):\n    time.sleep(x * {seconds} / 3)\n    return x * x")
    nb.cell("left = [ex.submit(slow_square, i) for i in range(4)]\nleft[0].result(timeout=60)\n"
            "deadline = time.monotonic() + 30\n"
            "while not all(f.task_id for f in left) and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)")
    nb.report(tag, "{'group': ex.task_group_id, 'sent': sum(bool(f.task_id) for f in left), "
                   "'done': sum(f.done() for f in left)}")


def add_reload(nb: Notebook, tag: str = "reloaded") -> None:
    """``ex.reload_tasks()`` (``ex`` made by :func:`start` with the earlier task group): reports
    every reloaded future's outcome, in submission order."""
    nb.cell("reloaded = ex.reload_tasks()")
    nb.report(tag, "[outcome(f) for f in reloaded]")
