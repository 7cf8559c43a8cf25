"""farcall: run Python functions on remote endpoints through a broker.

``Client`` and ``Executor`` are imported on first use, so a worker process that
only needs ``farcall.serialize`` and ``farcall.protocol`` stays quick to start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farcall.version import __version__

if TYPE_CHECKING:
    from farcall.client import Batch, Client
    from farcall.executor import ComputeFuture, Executor, TaskFuture
    from farcall.progress import as_completed
    from farcall.shell import MPIFunction, ShellFunction, ShellResult

__all__ = ["Batch", "Client", "ComputeFuture", "Executor", "TaskFuture", "__version__",
           "as_completed", "ShellFunction", "MPIFunction", "ShellResult"]

_LAZY = {
    "Batch": "farcall.client",
    "Client": "farcall.client",
    "Executor": "farcall.executor",
    "TaskFuture": "farcall.executor",
    "ComputeFuture": "farcall.executor",
    "as_completed": "farcall.progress",
    "ShellFunction": "farcall.shell",
    "MPIFunction": "farcall.shell",
    "ShellResult": "farcall.shell",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'farcall' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
