"""A notebook user's session in a real Jupyter kernel against the real broker and endpoint.

The cells are written as a user writes them (imports in one cell, constants, helpers and classes
in others, submissions later), and the kernel's ``__main__`` is the one the cells share, so what
travels is exactly what a notebook sends. Values come back as report lines the test reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from farcall import Client
from harness.serialization_cases import CASES, Case
from tests.integration.helpers import Broker, Endpoint
from tests.integration.notebooks import (
    ENDPOINT_VAR,
    Kernel,
    Notebook,
    Ran,
    add_big_array,
    add_progress,
    add_reload,
    add_remote_traceback,
    add_serialization_cases,
    add_size_error,
    add_submit_and_leave,
    install_kernel,
    start,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kernel(broker: Broker, token: str, make_module_endpoint: Callable[..., Endpoint],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    """A kernel spec whose kernels reach the broker and one running endpoint."""
    ep = make_module_endpoint("nb")
    with Client(broker_url=broker.url, token=token) as client:
        endpoint_id = ep.start(client)
    root = tmp_path_factory.mktemp("jupyter")
    yield install_kernel(root, {
        "FARCALL_BROKER_URL": broker.url, "FARCALL_TOKEN": token, "FARCALL_HOME": str(root / "home"),
        ENDPOINT_VAR: endpoint_id})


@pytest.fixture(scope="module")
def session(kernel: Kernel) -> Ran:
    """One notebook run: every serialization case, a big array, a size error, progress bars, a
    remote failure."""
    nb = Notebook()
    start(nb, CASES)
    add_serialization_cases(nb, CASES)
    add_big_array(nb, megabytes=50)
    add_size_error(nb)
    add_progress(nb)
    add_remote_traceback(nb)
    nb.cell("ex.shutdown()")
    return nb.run(kernel)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_what_a_notebook_defines_runs_remotely(case: Case, session: Ran) -> None:
    """The case's value, passed as an argument to a notebook function, is used remotely (for
    the bug case: a notebook class instance whose method uses ``math`` imported in another
    cell); a function value also runs as the task's function."""
    outcomes = session.reports["serialization"]
    assert outcomes[case.name] == {"value": case.want}, case.title
    if case.call is not None:
        assert outcomes[f"{case.name}:function"] == {"value": case.want}, case.title


def test_a_50_mb_array_goes_and_comes_back(session: Ran) -> None:
    assert session.reports["big_array"] == {"nbytes": 50 * 2**20, "doubled": True}


def test_an_oversized_call_fails_alone_and_says_what_to_raise(session: Ran) -> None:
    good, big, other = session.reports["size_error"]
    assert good == {"value": 10} and other == {"value": 20}
    assert big["error"].startswith("TaskTooLarge: ") and "FARCALL_MAX_TASK_BYTES" in big["error"]


def test_progress_bars_show_done_and_failed_counts(session: Ran) -> None:
    assert session.reports["progress"] == {"finished": 8, "mapped": [5, 4, 3, 2, 1]}
    completed, mapped = session.bars[-2:]
    assert (completed.value, completed.total) == (8, 8) and "failed=1" in completed.text
    assert (mapped.value, mapped.total) == (5, 5) and "failed=0" in mapped.text


def test_a_remote_failure_formats_with_the_cells_line(session: Ran) -> None:
    """``traceback.format_exception`` in the kernel names the cell's file (IPython's
    ``ipykernel_*`` name, which its line cache knows) and shows the failing line."""
    report = session.reports["traceback"]
    cell_file = report["file"]
    assert "ipykernel_" in cell_file
    assert (f'  File "{cell_file}", line 2, in boom\n'
            '    raise ValueError(f"boom-{tag}")\n'
            "ValueError: boom-caught\n") in report["formatted"], report["formatted"]


def test_ipython_shows_the_failing_line_of_the_remote_frame(session: Ran) -> None:
    """The error a cell shows when the remote failure propagates: IPython marks the failing
    line of the cell that defined ``boom``, counting from the cell's first line."""
    error = session.errors["traceback"]
    assert (error.ename, error.evalue) == ("ValueError", "boom-raised")
    assert re.search(r"Cell In\[\d+\], line 2, in boom\(.*\)\n"
                     r"\s+1 def boom\(tag\):\n"
                     r"-+> 2     raise ValueError\(f\"boom-\{tag\}\"\)\n", error.traceback), \
        error.traceback


def test_a_second_kernel_reloads_the_task_group_of_the_first(kernel: Kernel) -> None:
    first = Notebook()
    start(first)
    add_submit_and_leave(first, seconds=3)
    left = first.run(kernel).reports["left"]
    assert left["sent"] == 4 and left["done"] < 4, left  # the kernel ends with tasks unfinished
    second = Notebook()
    start(second, task_group=left["group"])
    add_reload(second)
    reloaded = second.run(kernel).reports["reloaded"]
    assert reloaded == [{"value": x * x} for x in range(4)]
