"""The one task every system runs, so their numbers differ only by the system.

It lives in an importable module (not ``__main__``) so that every worker, of
every system, loads it by reference rather than by value.
"""

from __future__ import annotations


def noop(x: int) -> int:
    """Return the argument: no work, and a result the caller can check."""
    return x
