"""What every conversation of the protocol shares: the version, task states, the models' base,
submitter and worker versions, id and resource-specification fields, and earlier attempts.

``PROTOCOL_VERSION`` is bumped on any incompatible change; peers send it in ``hello`` and refuse
a version they do not speak. Saved frames of every message type (tests/protocol/frames) pin the
format: tasks wait in durable queues across upgrades.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1


def now() -> float:
    """Wall-clock timestamp used for every state transition (seconds since the epoch)."""
    return time.time()


class TaskState(enum.StrEnum):
    RECEIVED = "received"
    WAITING = "waiting-for-endpoint"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Final: the task has its outcome and never changes state again."""
        return self in (TaskState.SUCCESS, TaskState.FAILED, TaskState.CANCELLED)


class Message(BaseModel):
    """The base of every message: unknown fields are ignored (a newer peer may add some)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Versions(Message):
    """Interpreter and serializer versions of one side (submitter or worker)."""

    python: str
    dill: str
    farcall: str = ""
    cloudpickle: str = ""
    """Empty from a farcall that did not report it (before cloudpickle was used)."""

    def describe(self) -> str:
        return (f"Python {self.python}, dill {self.dill}, cloudpickle {self.cloudpickle or '?'}, "
                f"farcall {self.farcall or '?'}")


SAME_VERSIONS = "use the same Python, dill and cloudpickle versions on both sides"
"""The advice every version-mismatch message ends with."""


def _versions(v: Versions | dict[str, Any] | None) -> Versions | None:
    return v if isinstance(v, Versions) or v is None else Versions.model_validate(v)


def versions_text(submitter: Versions | dict[str, Any] | None,
                  worker: Versions | dict[str, Any] | None) -> str:
    """Both sides' versions, as every message about a mismatch names them."""
    sub, wrk = _versions(submitter), _versions(worker)
    return (f"submitter: {sub.describe() if sub else 'unknown versions'}; "
            f"worker: {wrk.describe() if wrk else 'unknown versions'}")


def version_mismatch(submitter: Versions | dict[str, Any] | None,
                     worker: Versions | dict[str, Any] | None) -> str:
    """A warning when submitter and worker run different Python (major.minor), dill or cloudpickle
    versions; ``""`` when they match or either is unknown."""
    sub, wrk = _versions(submitter), _versions(worker)
    if sub is None or wrk is None:
        return ""
    same_cloudpickle = sub.cloudpickle == wrk.cloudpickle or not (sub.cloudpickle and wrk.cloudpickle)
    if (sub.python.split(".")[:2] == wrk.python.split(".")[:2] and sub.dill == wrk.dill
            and same_cloudpickle):
        return ""
    return (f"the two sides run different versions ({versions_text(sub, wrk)}): functions and "
            f"results may fail to load; {SAME_VERSIONS}")


ObjectId = Annotated[str, Field(min_length=1, max_length=64, description="an id the broker gave")]
"""Ids the broker hands out are UUIDs; anything longer is refused before it is looked up."""
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"
Username = Annotated[str, Field(pattern=USERNAME_PATTERN, description=(
    "a user's name on the broker: letters, digits and . _ @ + -, at most 64"))]


MAX_SPEC_DEPTH = 16
"""Deepest nesting of a ``resource_specification`` (a dict inside a dict ... counts each level)."""
MAX_SPEC_BYTES = 16 * 1024
"""Largest ``resource_specification``, as JSON."""
MAX_WALLTIME = 366 * 24 * 3600.0
MAX_RETRIES = 100


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting no further than ``limit + 1``."""
    if not isinstance(value, dict | list) or limit < 0:
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def check_resource_specification(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """``spec`` if it is within ``MAX_SPEC_DEPTH`` and ``MAX_SPEC_BYTES``; ``ValueError`` otherwise.

    Every hop (submission, the broker's queue reader, the agent) parses task JSON with
    these limits, so a task the broker accepts is one every later parser can read.
    """
    if spec is not None and not isinstance(spec, dict):
        raise TypeError(f"resource_specification must be a dict such as {{'num_nodes': 2, "
                        f"'ranks_per_node': 4}}, got {type(spec).__name__}")
    return _check_options(spec, "resource_specification",
                          "it holds scheduler options such as num_nodes, not data",
                          "pass data as arguments, not in the resource specification")


RESERVED_USER_CONFIG_NAMES = ("local_user", "local_uid", "local_gid", "local_home", "parent_config",
                              "_GC", "mapped_identity", "user_runtime")
"""Names a multi-user endpoint's manager gives its template itself (the local account, its own
configuration): a ``user_endpoint_config`` may not use them."""


def check_user_endpoint_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` if it is a JSON object within the limits of a ``resource_specification``
    without a reserved name; ``ValueError`` (or ``TypeError`` for a value that is not a dict)
    otherwise."""
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"user_endpoint_config must be a dict of the values the multi-user "
                        f"endpoint's template takes, got {type(config).__name__}")
    reserved = [name for name in RESERVED_USER_CONFIG_NAMES if config and name in config]
    if reserved:
        raise ValueError(f"user_endpoint_config may not set {', '.join(reserved)}: the multi-user "
                         "endpoint sets these itself (the local account it runs your tasks as, "
                         "its own configuration); remove them")
    return _check_options(config, "user_endpoint_config",
                          "it holds the values of a configuration such as account or nodes",
                          "pass data as arguments, not in the user endpoint's configuration")


def _check_options(value: dict[str, Any] | None, name: str, what: str, instead: str
                   ) -> dict[str, Any] | None:
    if value is None:
        return None
    if _depth(value, MAX_SPEC_DEPTH) > MAX_SPEC_DEPTH:
        raise ValueError(f"{name} is nested deeper than {MAX_SPEC_DEPTH} levels; flatten it ({what})")
    try:
        size = len(json.dumps(value))
    except TypeError as e:  # a value JSON has no form for
        raise ValueError(f"{name} must hold only JSON values (str, numbers, bools, None, lists "
                         f"and dicts): {e}") from None
    if size > MAX_SPEC_BYTES:
        raise ValueError(f"{name} is {size} bytes as JSON, over the limit of {MAX_SPEC_BYTES}; "
                         f"{instead}")
    return value


SpecField = Annotated[dict[str, Any] | None, AfterValidator(check_resource_specification)]
UserConfigField = Annotated[dict[str, Any] | None, AfterValidator(check_user_endpoint_config)]
WalltimeField = Annotated[float | None, Field(default=None, gt=0, le=MAX_WALLTIME, description=(
    "seconds the task may run on a worker; past it the task fails with TaskTimeout"))]
RetriesField = Annotated[int, Field(default=0, ge=0, le=MAX_RETRIES, description=(
    "times to run the task again when a system failure (a lost worker) cut it short"))]
ResultFormat = Literal["pickle", "json"]
"""How a worker serializes a task's return value: ``pickle`` (farcall.serialize.serialize, what
the SDK reads) or ``json`` (strategy 12, what the Action Provider API hands a flow; a value that
is not JSON fails the task)."""


class Attempt(Message):
    """An earlier try of a task that a system failure cut short; the task ran again after it."""

    at: float
    error: str


def as_bytes(raw: str | bytes) -> bytes:
    return raw.encode() if isinstance(raw, str) else raw
