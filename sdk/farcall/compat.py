"""Arguments Globus Compute programs pass that farcall has no use for.

A program written for ``globus_compute_sdk`` runs on farcall with its import line changed, so
farcall takes every argument such a program may pass. The ones farcall honours are parameters of
its own classes; each one here is accepted and says once per process, as a
:class:`~farcall.errors.CompatibilityWarning`, what farcall does instead. The texts are the table
of ``docs/migrating.md``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from farcall.errors import CompatibilityWarning

STREAM = ("farcall sends tasks and streams results over the broker's one HTTPS/WebSocket port "
          "(FARCALL_BROKER_URL); there is no AMQP connection to configure")
BURST = ("farcall sends every task queued while a request is in flight as one batch, and waits "
         "and retries when the broker answers 429 (within Client(retry_seconds=...))")
RESULTS = ("farcall's endpoint picks how to serialize each result (pickle, cloudpickle, then dill) "
           "and the submitter reads whichever it picked")
DATA = ("farcall picks how to serialize each argument (pickle, cloudpickle, then dill; JSON for "
        "flows) and falls back by itself")

EXECUTOR = {
    "amqp_port": STREAM,
    "api_burst_limit": BURST,
    "api_burst_window_s": BURST,
    "result_serializers": RESULTS,
    "batch_interval": ("farcall sends at once what is queued, in batches of up to batch_size "
                       "while a request is in flight"),
    "batch_enabled": "farcall always sends tasks in batches (of up to batch_size)",
    "container_id": ("farcall runs tasks in the container the endpoint's engine is configured "
                     "with (its container keys in config.yaml); ask the endpoint's operator"),
}
"""``Executor`` keyword arguments farcall accepts and does not use: what it does instead."""

CLIENT = {
    "environment": ("farcall talks to the broker at FARCALL_BROKER_URL (or Client(broker_url="
                    "...)); there are no named environments"),
    "local_compute_services": "farcall talks to the broker at FARCALL_BROKER_URL",
    "app": ("farcall authenticates with a bearer token: FARCALL_TOKEN, $FARCALL_HOME/config, "
            "or Client(token=...); there is no login flow"),
    "authorizer": "farcall authenticates with a bearer token: FARCALL_TOKEN or Client(token=...)",
    "login_manager": "farcall authenticates with a bearer token: FARCALL_TOKEN or Client(token=...)",
    "data_serialization_strategy": DATA,
}
"""``Client(...)`` keyword arguments farcall accepts and does not use."""

REGISTER = {
    "metadata": ("farcall records the submitter's Python, dill and farcall versions with every "
                 "task, and warns when the worker's differ"),
    "group": ("farcall shares a function with one user by name, Client.share_function("
              "function_id, username=...), or with everyone (public=True); it was not shared"),
    "searchable": "farcall lists no functions for others to find; share one by name instead",
    "ha_endpoint_id": ("farcall does not tie functions to an endpoint; an endpoint's "
                       "allowed_functions (config.yaml) limits what runs there"),
    "container_uuid": EXECUTOR["container_id"],
}
"""``Client.register_function`` keyword arguments farcall accepts and does not use."""

BATCH = {
    "create_websocket_queue": ("farcall's result stream needs no queue: an Executor opens it "
                               "for its task group, and Client.get_batch_result polls"),
    "result_serializers": RESULTS,
}
"""``Client.create_batch`` keyword arguments farcall accepts and does not use."""

_warned: set[str] = set()
_lock = threading.Lock()


def warn_once(key: str, message: str, stacklevel: int = 3) -> bool:
    """Warn ``message`` the first time ``key`` comes up in this process; True if it did now."""
    with _lock:
        if key in _warned:
            return False
        _warned.add(key)
    warnings.warn(message, CompatibilityWarning, stacklevel=stacklevel)
    return True


def accept(where: str, table: dict[str, str], given: dict[str, Any], stacklevel: int = 4) -> None:
    """Warn once for each argument of ``given`` (name -> value; None: not passed) that ``where``
    (``"Executor"``, ``"Client.register_function"``...) accepts without using."""
    for name, value in given.items():
        if value is not None:
            warn_once(f"{where}({name}=)", f"{where}({name}=...) is accepted and not used: "
                      f"{table[name]}", stacklevel)


class Unused:
    """An attribute Globus Compute programs may read and set, that farcall does not use: setting
    it to anything but None warns once (as passing it to the constructor does); it reads back
    what was set."""

    def __init__(self, where: str, table: dict[str, str]) -> None:
        self.where, self.table = where, table
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        return self if obj is None else vars(obj).get(f"_unused_{self.name}")

    def __set__(self, obj: object, value: Any) -> None:
        accept(self.where, self.table, {self.name: value}, stacklevel=5)
        vars(obj)[f"_unused_{self.name}"] = value


def reset() -> None:
    """Forget which warnings were given (for tests)."""
    with _lock:
        _warned.clear()
