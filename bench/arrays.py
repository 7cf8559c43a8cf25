"""The task of the data benchmark: take an array, return it, and say when it ran.

Importable (not ``__main__``), so every worker of every system loads it by reference.
"""

from __future__ import annotations

import time
from typing import Any


def stamp(array: Any) -> tuple[float, Any]:
    """``(time.time() when the call began, array)``: the start splits a round trip in two, the
    way there (upload, dispatch, the worker's download) and the way back."""
    return time.time(), array
