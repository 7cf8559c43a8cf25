"""``engine.allowed_serializers``: which ways of serializing a task's function and arguments
an endpoint accepts, named as Globus Compute names them.

A farcall payload starts with its strategy code (``farcall.serialize``), so an engine can tell
how a task was serialized without deserializing anything, and refuse it before any worker
unpickles it. Globus Compute's strategies map onto farcall's by what a worker must do to read
them, which is what an allowlist is about:

- code read by unpickling (``DillCode``, the deprecated ``PickleCode``): farcall's functions
  by value, ``dill`` (``01``) and ``cloudpickle`` (``03``);
- code sent as source text (``PureSourceTextInspect``, ``PureSourceDill``, and the older
  ``DillCodeSource``, ``DillCodeTextInspect``): farcall's ``source`` strategy (``02``), which
  unpickles nothing;
- pickled data (``DillDataBase64``): farcall's ``pickle``, ``cloudpickle`` and ``dill`` data
  (``11``, ``13``, ``10``) and data-plane blobs (``30``, always pickled);
- ``JSONData``: farcall's JSON data (``12``);
- ``AllCodeStrategies``/``CombinedCode``, ``AllDataStrategies`` and the wildcards
  ``globus_compute_sdk.*Code``/``*Data``: every strategy of that kind.

As in Globus Compute, a list names at least one code and one data strategy. A refused task
fails with ``DeserializationError`` naming what it was sent as and what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from farcall import serialize as s
from farcall.endpoint import problems
from farcall.errors import DeserializationError
from farcall.protocol.channel import TaskMessage

KEY = "engine.allowed_serializers"
PICKLED_CODE = frozenset({s.FUNCTION_DILL, s.FUNCTION_CLOUDPICKLE})
SOURCE_CODE = frozenset({s.FUNCTION_SOURCE})
PICKLED_DATA = frozenset({s.DATA_PICKLE, s.DATA_CLOUDPICKLE, s.DATA_DILL, s.BLOB_REF})
JSON_DATA = frozenset({s.DATA_JSON})

CODE: dict[str, frozenset[str]] = {
    "DillCode": PICKLED_CODE,
    "PickleCode": PICKLED_CODE,
    "PureSourceTextInspect": SOURCE_CODE,
    "PureSourceDill": SOURCE_CODE,
    "DillCodeSource": SOURCE_CODE,
    "DillCodeTextInspect": SOURCE_CODE,
    "AllCodeStrategies": PICKLED_CODE | SOURCE_CODE,
    "CombinedCode": PICKLED_CODE | SOURCE_CODE,
}
DATA: dict[str, frozenset[str]] = {
    "DillDataBase64": PICKLED_DATA,
    "JSONData": JSON_DATA,
    "AllDataStrategies": PICKLED_DATA | JSON_DATA,
}
WILDCARDS = {"globus_compute_sdk.*Code": CODE["AllCodeStrategies"],
             "globus_compute_sdk.*Data": DATA["AllDataStrategies"]}
PREFIXES = ("globus_compute_sdk.serialize.concretes.", "globus_compute_sdk.serialize.", "")
NAMES = {s.FUNCTION_DILL: "dill (function by value)", s.FUNCTION_CLOUDPICKLE:
         "cloudpickle (function by value)", s.FUNCTION_SOURCE: "source (function as source text)",
         s.DATA_PICKLE: "pickle", s.DATA_CLOUDPICKLE: "cloudpickle", s.DATA_DILL: "dill",
         s.DATA_JSON: "JSON", s.BLOB_REF: "a pickled data-plane blob"}


def accepted() -> str:
    """The names an allowlist may hold (for error messages)."""
    return ", ".join(["globus_compute_sdk.serialize." + n for n in (*CODE, *DATA)] + list(WILDCARDS))


@dataclass(frozen=True)
class Allowlist:
    """The strategy codes an engine accepts for functions and for arguments."""

    names: tuple[str, ...]
    code: frozenset[str]
    data: frozenset[str]

    def refusal(self, task: TaskMessage) -> DeserializationError | None:
        """Why ``task`` may not run here, or None. Reads only the payloads' strategy codes."""
        for what, payload, allowed in (("function", task.function, self.code),
                                       ("arguments", task.args, self.data)):
            code = s.payload_strategy(payload)
            if code not in allowed:
                how = NAMES.get(code, f"strategy {code!r}")
                return DeserializationError(
                    f"task {task.task_id}: its {what} were serialized with {how}, which this "
                    f"endpoint does not accept (engine.allowed_serializers: "
                    f"{', '.join(self.names)}). "
                    + ("Register the function with strategy='source' (Client.register_function"
                       "(f, strategy='source')) if source is allowed, or ask the endpoint's "
                       "operator to allow it" if what == "function" else
                       "Pass arguments the endpoint accepts, or ask its operator to allow them"))
        return None


def parse_allowlist(value: Iterable[str] | None) -> Allowlist | None:
    """The allowlist ``engine.allowed_serializers`` names; None when unset (everything goes).

    Each problem is recorded with ``problems.error``; what is left is still returned.
    """
    if not value:
        return None
    if isinstance(value, str):
        problems.error(KEY, f"expected a list of names, got the string {value!r}; write "
                            f"[{value}] or a list of: {accepted()}")
        return None
    code: set[str] = set()
    data: set[str] = set()
    names = []
    for name in value:
        name = str(name)
        names.append(name.rpartition(".")[2] if name not in WILDCARDS else name)
        if name in WILDCARDS:
            (code if name.endswith("Code") else data).update(WILDCARDS[name])
            continue
        short = next((name.removeprefix(p) for p in PREFIXES if name.startswith(p)
                      and name.removeprefix(p) in CODE.keys() | DATA.keys()), None)
        if short is None:
            problems.error(KEY, f"{name!r} is not a Globus Compute serialization strategy farcall "
                                f"knows; valid names: {accepted()}")
        elif short in CODE:
            code.update(CODE[short])
        else:
            data.update(DATA[short])
    if not code or not data:
        problems.error(KEY, f"names no {'code' if not code else 'data'} strategy; as in Globus "
                            "Compute, list at least one code strategy and one data strategy "
                            "(e.g. globus_compute_sdk.*Code and globus_compute_sdk.serialize."
                            "JSONData), or leave allowed_serializers out to accept all")
    return Allowlist(tuple(names), frozenset(code), frozenset(data))
