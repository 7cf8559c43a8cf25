"""The Python on the documentation pages runs as written, so the docs cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from harness import REPO

RUNNABLE = ["quickstart.md", "functions.md", "timers.md"]


def python_blocks(page: str) -> str:
    text = (REPO / "docs" / page).read_text()
    return "\n\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs(page: str) -> None:
    code = python_blocks(page)
    assert code.strip(), f"docs/{page} has no python blocks"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    if page == "quickstart.md":
        out = done.stdout
        assert "remote error: division by zero" in out
        assert "online" in out and "'success'" in out
