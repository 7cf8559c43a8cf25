"""Fixtures of the endpoint tests; makes this directory's helpers (``ep_helpers``, ``fake_broker``)
importable."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from fake_broker import FakeBroker  # noqa: E402


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    """A stand-in broker endpoint channel on loopback."""
    b = FakeBroker()
    yield b
    b.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment for CLI subprocesses: no FARCALL_ settings but a private FARCALL_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARCALL_")}
    env["FARCALL_HOME"] = str(tmp_path / "home")
    return env
