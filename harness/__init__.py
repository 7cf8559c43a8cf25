"""What tests/ and bench/ share: the local Redis and RabbitMQ, child processes, waiting on conditions.

Not part of the installed package; importable from the repository root (pytest's
``pythonpath`` and ``python -m bench`` both put it there).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root."""
BIN = Path(sys.executable).parent
"""The running interpreter's bin/ (the venv's), where farcall's commands are."""
