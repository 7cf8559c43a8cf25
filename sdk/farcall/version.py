"""Version of farcall and the versions a task carries to its worker."""

from __future__ import annotations

import platform

import cloudpickle
import dill

__version__ = "0.1.0"


def local_versions() -> dict[str, str]:
    """Python, dill, cloudpickle and farcall versions of this interpreter."""
    return {"python": platform.python_version(), "dill": dill.__version__,
            "cloudpickle": cloudpickle.__version__, "farcall": __version__}
