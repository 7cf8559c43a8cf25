"""What the numbers were measured on: the machine, the Python, and the version of every system."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import psutil

from bench import services
from farcall.hardware import cpu_model

PACKAGES = ("farcall", "parsl", "celery", "kombu", "redis", "dask", "distributed", "pika", "psutil",
            "uvicorn", "fastapi", "aio-pika", "dill", "cloudpickle")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    versions: dict[str, Any] = {name: _version(name) for name in PACKAGES}
    for name, probe in (("redis-server", services.redis_version), ("rabbitmq", services.rabbitmq_version)):
        try:
            versions[name] = probe()
        except Exception as e:  # noqa: BLE001 - report the failure instead of the version
            versions[name] = f"unknown ({e})"
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "os": platform.platform(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions,
    }
