"""``user_endpoints.json``: the running manager's user endpoints, for ``status`` and ``list``.

The manager rewrites it (atomically, stamped with its pid) when a user endpoint starts, connects
or ends, and every few seconds while they work; readers trust it only while that pid runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from farcall.endpoint import daemon
from farcall.endpoint.config import USER_ENDPOINTS_STATE


def write_user_endpoints(directory: Path, rows: list[dict[str, Any]]) -> None:
    path = directory / USER_ENDPOINTS_STATE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "updated_at": time.time(),
                               "user_endpoints": rows}))
    os.replace(tmp, path)


def read_user_endpoints(directory: Path) -> list[dict[str, Any]] | None:
    """The user endpoints the running manager in ``directory`` last wrote, each with
    ``idle_seconds`` (since its last task event); ``None`` when no manager runs there."""
    try:
        found = json.loads((directory / USER_ENDPOINTS_STATE).read_text())
    except (OSError, ValueError):
        return None
    pid = daemon.running_pid(directory)
    if pid is None or not isinstance(found, dict) or found.get("pid") != pid:
        return None
    now = time.time()
    rows = [r for r in found.get("user_endpoints") or [] if isinstance(r, dict)]
    for r in rows:
        r["idle_seconds"] = round(max(0.0, now - float(r.get("last_activity") or now)), 1)
    return rows
