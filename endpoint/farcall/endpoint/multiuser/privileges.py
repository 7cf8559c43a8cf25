"""Whether a manager may start user endpoints as other accounts, or only as its own.

As in Globus Compute, a manager run by root (or with both ``CAP_SETUID`` and ``CAP_SETGID``)
maps each user to their own account; one run by an ordinary account (neither capability)
starts its owner's user endpoints as that account, with no identity mapping. A process with
only one of the two capabilities could change its uid but not its groups (or the reverse),
so it is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from farcall.endpoint.errors import EndpointError

__all__ = ["CAP_SETGID", "CAP_SETUID", "check_privileges", "effective_capabilities"]

CAP_SETGID = 6
CAP_SETUID = 7
USER_CHANGE = (1 << CAP_SETUID) | (1 << CAP_SETGID)


def effective_capabilities() -> int:
    """This process's effective capability set (``CapEff`` of ``/proc/self/status``; 0 when it
    cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def check_privileges() -> bool:
    """True when this process may become other users (root, or ``CAP_SETUID`` and
    ``CAP_SETGID``); False for an ordinary account (neither). ``EndpointError`` for a process
    with one of the two capabilities only."""
    if os.geteuid() == 0:
        return True
    held = effective_capabilities() & USER_CHANGE
    if held == USER_CHANGE:
        return True
    if not held:
        return False
    has, lacks = ("CAP_SETUID", "CAP_SETGID") if held & (1 << CAP_SETUID) else (
        "CAP_SETGID", "CAP_SETUID")
    raise EndpointError(
        f"this multi-user endpoint's manager has {has} but not {lacks} (uid {os.geteuid()}), so it "
        "could change only half of a user's identity. Give it both capabilities (or run it as "
        "root) to start each user's endpoint as their own account, or neither, to start its "
        "owner's user endpoints as its own account (docs/multi-user.md)")
