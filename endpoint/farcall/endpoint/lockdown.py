"""What the agent does so that its tasks cannot take what it holds.

Tasks run as the endpoint's Unix account, beside the agent. The agent needs only its
endpoint credential once registered, so:

- ``drop_user_token`` removes ``FARCALL_TOKEN`` from the agent's environment after
  registration, both from ``os.environ`` (so nothing it starts inherits it) and from the
  process's initial environment block, which ``/proc/<pid>/environ`` shows for ever otherwise;
- ``warn_user_token`` says at start where a user token still lies (environment, the operator's
  config file), which a task on a shared endpoint could read;
- ``make_undumpable`` (Linux, best effort) marks the process non-dumpable: another process of
  the same account (a task, or something a task left behind) can no longer read its
  ``/proc/<pid>/environ`` or memory, nor attach a debugger; no core files are written. The
  agent and every process-pool worker do it at start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

from farcall import config as sdk_config
from farcall.errors import ConfigurationError

log = logging.getLogger(__name__)

TOKEN_VARIABLE = "FARCALL_TOKEN"
PR_SET_DUMPABLE = 4


def make_undumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``: True when it took (Linux only). The flag is not inherited
    across ``exec``: each worker process sets it for itself."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def drop_user_token() -> bool:
    """Remove ``FARCALL_TOKEN`` from this process's environment; True if it was there.

    ``del os.environ[...]`` alone leaves the value in the initial environment block that
    ``/proc/<pid>/environ`` reads, so the value's bytes there are overwritten first.
    """
    if TOKEN_VARIABLE not in os.environ:
        return False
    _blank_in_place(TOKEN_VARIABLE)
    del os.environ[TOKEN_VARIABLE]
    return True


def _blank_in_place(name: str) -> None:
    """Zero the value of ``name`` where the C ``environ`` array points (best effort, Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    except (OSError, ValueError):
        return
    prefix = name.encode() + b"="
    i = 0
    while (address := environ[i]) is not None:
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        i += 1


def warn_user_token(registered: bool) -> None:
    """Log where a user token lies that tasks could read; ``registered``: no start needs it."""
    need = ("it is not needed once the endpoint is registered" if registered else
            "it is needed only to register this endpoint")
    if os.environ.get(TOKEN_VARIABLE):
        # Needed to register: said, not warned; needless once registered: a warning.
        log.log(logging.WARNING if registered else logging.INFO,
                "%s is set in the agent's environment: %s. The agent drops it after "
                    "registration, so workers never see it; leave it out of the service's "
                    "environment once the endpoint is registered", TOKEN_VARIABLE, need)
    try:
        in_file = bool(sdk_config.user_settings().get("token"))
    except ConfigurationError:  # a broken file: the CLI says so where it reads it
        in_file = False
    if in_file:
        log.warning("%s holds a user token: %s, and any task on this endpoint runs as this Unix "
                    "account and can read that file (on a shared endpoint: every user it is "
                    "shared with). Remove the token from it on the endpoint's host",
                    sdk_config.config_path(), need)
