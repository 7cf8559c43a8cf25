"""The documents of the Action Provider API (``/action-provider``, see docs/flows.md).

A flow engine (Globus Flows, or an engine modelled on it) runs a farcall function as one
step of a flow through these documents: an ``ActionRequest`` in, an ``ActionStatus`` back
on every call, the ``ActionProviderDescription`` from introspection. They follow the Action
Provider specification (api_version 1.0); the request ``body`` takes the input of the Globus
Compute action provider, in its current and its earlier form, so a flow definition moves
over by changing only its ActionUrl. Arguments and results are plain JSON, since a flow
cannot carry anything else.

Principals are URNs: a farcall user is ``urn:globus:auth:identity:<identity_id>``, where
``identity_id`` is the user's id (``Client.whoami()``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from farcall.protocol.common import ObjectId, SpecField

IDENTITY_URN = "urn:globus:auth:identity:"
"""Prefix of a user's principal URN; the rest is the user's ``identity_id``."""
PRINCIPAL_PATTERN = (r"^urn:globus:(auth:identity|groups:id):[a-fA-F0-9]{8}-[a-fA-F0-9]{4}-"
                     r"[a-fA-F0-9]{4}-[a-fA-F0-9]{4}-[a-fA-F0-9]{12}$")
"""What the specification takes as a principal: a user's or a group's URN (farcall has no
groups, so a group URN is accepted and grants nobody anything)."""
DURATION_PATTERN = (r"^P(?!$)(\d+(?:\.\d+)?Y)?(\d+(?:\.\d+)?M)?(\d+(?:\.\d+)?W)?(\d+(?:\.\d+)?D)?"
                    r"(T(?=\d)(\d+(?:\.\d+)?H)?(\d+(?:\.\d+)?M)?(\d+(?:\.\d+)?S)?)?$")
"""An ISO 8601 duration (``P30D``, ``PT2H``, ``PT90S``), as ``release_after`` is written."""
MAX_ACTION_TASKS = 1024
"""Most tasks one action runs (one request body); run more as several actions."""
API_VERSION = "1.0"

Principal = Annotated[str, Field(pattern=PRINCIPAL_PATTERN, description=(
    "urn:globus:auth:identity:<identity_id> of a farcall user (Client.whoami())"))]

ActionState = Literal["ACTIVE", "INACTIVE", "SUCCEEDED", "FAILED"]
TERMINAL: frozenset[str] = frozenset({"SUCCEEDED", "FAILED"})


def identity_urn(identity_id: str) -> str:
    """The principal URN of the farcall user ``identity_id``."""
    return IDENTITY_URN + identity_id


_UNITS = {"Y": 365 * 86400.0, "W": 7 * 86400.0, "D": 86400.0, "H": 3600.0, "S": 1.0}


def duration_seconds(text: str) -> float:
    """Seconds in an ISO 8601 duration (a year counts 365 days, a month 30); ``ValueError`` if
    ``text`` is not one."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 duration such as P30D or PT1H")
    date, _, time = text[1:].partition("T")
    total = 0.0
    for part, minute in ((date, False), (time, True)):
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)([YMWDHS])", part):
            total += float(number) * (60.0 if unit == "M" and minute else
                                      30 * 86400.0 if unit == "M" else _UNITS[unit])
    return total


def _duration(text: str) -> str:
    duration_seconds(text)
    return text


Duration = Annotated[str, AfterValidator(_duration), Field(
    description="an ISO 8601 duration, such as P30D or PT1H",
    json_schema_extra={"pattern": DURATION_PATTERN})]
"""Checked by Python's ``re``: the pattern looks ahead, which pydantic's own engine cannot."""


def iso_duration(seconds: float) -> str:
    """``seconds`` (whole ones) as an ISO 8601 duration: ``P30D``, ``PT1H``, ``P1DT1M30S``."""
    days, rest = divmod(max(0, round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    time = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M"), (secs, "S")) if n)
    if not days and not time:
        return "PT0S"
    return "P" + (f"{days}D" if days else "") + (f"T{time}" if time else "")


def iso_time(at: float) -> str:
    """A timestamp (seconds since the epoch) as ISO 8601 with its time zone (UTC)."""
    return datetime.fromtimestamp(at, UTC).isoformat()


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Strict(BaseModel):
    """A part of the request body: a misspelt or unknown field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------ the request


class ActionRequest(_Doc):
    """``POST /run`` (and ``POST /actions``): start an action. Fields the specification
    defines and farcall has no use for (``allowed_clients``, ``deadline``) are accepted."""

    request_id: str = Field(min_length=1, max_length=1024, description=(
        "the caller's id for this request: sending it again returns the same action"))
    body: dict[str, Any] = Field(description="the input: see input_schema in the introspection")
    label: str | None = Field(default=None, min_length=1, max_length=64)
    monitor_by: list[Principal] = Field(default_factory=list, max_length=100, description=(
        "who else may see the action (status, log)"))
    manage_by: list[Principal] = Field(default_factory=list, max_length=100, description=(
        "who else may see, cancel and release the action"))
    allowed_clients: list[str] = Field(default_factory=list)
    deadline: str | None = None
    release_after: Duration | None = Field(default=None, description=(
        "how long the action's final status is kept after it ends (default and most: P30D)"))

    def digest(self) -> str:
        """What tells a repeated request from a different one with the same ``request_id``."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class ComputeTask(_Strict):
    """One call in the current form."""

    function_id: ObjectId
    args: list[Any] = Field(default_factory=list, description="positional arguments (JSON)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments (JSON)")


class ComputeInput(_Strict):
    """The current form: every task on one endpoint."""

    endpoint_id: ObjectId
    tasks: list[ComputeTask] = Field(min_length=1, max_length=MAX_ACTION_TASKS)
    task_group_id: ObjectId | None = Field(default=None, description=(
        "one of your task groups to add the tasks to (a new group when left out)"))
    resource_specification: SpecField = Field(default=None, description=(
        "scheduler options for every task (num_nodes, ranks_per_node, ...)"))


class _EarlierCall(_Strict):
    """What a call of the earlier form holds, in the body or in one of its ``tasks``."""

    endpoint: ObjectId | None = None
    args: Any = Field(default_factory=list, description="a list of arguments, or one argument")
    kwargs: dict[str, Any] | None = None
    payload: dict[str, Any] | None = Field(default=None, description="the keyword arguments "
                                           "(the name an earlier version used for kwargs)")

    @model_validator(mode="after")
    def _one_kwargs(self) -> _EarlierCall:
        if self.kwargs is not None and self.payload is not None:
            raise ValueError("give the keyword arguments as 'kwargs' or as 'payload', not both")
        return self


class EarlierTask(_EarlierCall):
    """One call in the earlier form; ``endpoint`` defaults to the body's."""

    function: ObjectId


class EarlierInput(_EarlierCall):
    """The earlier form: one call in the body itself, and/or a list of ``tasks``, each on any
    endpoint."""

    function: ObjectId | None = None
    tasks: list[EarlierTask] = Field(default_factory=list, max_length=MAX_ACTION_TASKS)

    @model_validator(mode="after")
    def _some_task(self) -> EarlierInput:
        if self.function is None and not self.tasks:
            raise ValueError("no task: give 'function' (with 'endpoint'), or 'tasks'")
        if len(self.tasks) + (self.function is not None) > MAX_ACTION_TASKS:
            raise ValueError(f"more than {MAX_ACTION_TASKS} tasks; run them as several actions")
        for i, task in enumerate(self.tasks):
            if task.endpoint is None and self.endpoint is None:
                raise ValueError(f"tasks[{i}] names no endpoint, and the body has none either")
        if self.function is not None and self.endpoint is None:
            raise ValueError("'function' is given without 'endpoint'")
        return self


INPUT_SCHEMA: dict[str, Any] = TypeAdapter(ComputeInput | EarlierInput).json_schema()
"""The JSON Schema of the request body (introspection's ``input_schema``)."""


@dataclass(frozen=True)
class ActionCall:
    """One task an action runs, whichever form asked for it."""

    endpoint_id: str
    function_id: str
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class ActionInput:
    """A request body read into the calls it asks for, in order."""

    calls: list[ActionCall]
    task_group_id: str | None = None
    resource_specification: dict[str, Any] | None = None


def read_input(body: dict[str, Any]) -> ActionInput:
    """The calls of a request body, current form (it has ``endpoint_id``) or earlier form;
    ``pydantic.ValidationError`` (with ``body.`` locations) when it is neither."""
    if "endpoint_id" in body:
        current = ComputeInput.model_validate(body)
        return ActionInput(
            [ActionCall(current.endpoint_id, t.function_id, t.args, t.kwargs)
             for t in current.tasks],
            current.task_group_id, current.resource_specification)
    earlier = EarlierInput.model_validate(body)
    calls = []
    if earlier.function is not None:
        calls.append(_earlier_call(earlier.endpoint, earlier.function, earlier.args,
                                   earlier.kwargs, earlier.payload))
    calls += [_earlier_call(t.endpoint or earlier.endpoint, t.function, t.args, t.kwargs,
                            t.payload) for t in earlier.tasks]
    return ActionInput(calls)


def _earlier_call(endpoint: str | None, function: str, args: Any, kwargs: dict[str, Any] | None,
                  payload: dict[str, Any] | None) -> ActionCall:
    assert endpoint is not None  # EarlierInput checked it
    return ActionCall(endpoint, function, args if isinstance(args, list) else [args],
                      kwargs if kwargs is not None else payload or {})


def input_errors(e: ValidationError) -> list[dict[str, Any]]:
    """A body's validation errors, located under ``body``."""
    return [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]


# ------------------------------------------------------------------------- the answers


class ActionStatus(_Doc):
    """What every operation on an action answers (the log excepted). ``details`` holds the
    outcome: ``results``, one entry per task in order, once the action ended."""

    action_id: str
    status: ActionState
    creator_id: str
    label: str | None = None
    monitor_by: list[str] = Field(default_factory=list)
    manage_by: list[str] = Field(default_factory=list)
    start_time: str
    completion_time: str | None = None
    release_after: str
    display_status: str | None = Field(default=None, min_length=1, max_length=64)
    details: dict[str, Any]

    def document(self) -> dict[str, Any]:
        """As JSON, without the fields that have no value (the specification allows no null)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if v is not None}


class ActionProviderDescription(_Doc):
    """``GET /action-provider/``: what the provider does and what its input looks like."""

    types: list[str] = Field(default_factory=lambda: ["ACTION"])
    api_version: str = API_VERSION
    globus_auth_scope: str
    title: str
    subtitle: str
    description: str
    keywords: list[str]
    admin_contact: str
    synchronous: bool = False
    log_supported: bool = True
    visible_to: list[str] = Field(default_factory=lambda: ["public"])
    runnable_by: list[str] = Field(default_factory=lambda: ["all_authenticated_users"])
    maximum_deadline: str
    input_schema: dict[str, Any]


class ActionLogEntry(_Doc):
    code: str
    description: str
    details: dict[str, Any] | None = None


class ActionLog(_Doc):
    """``GET /{action_id}/log``: what happened to the action's tasks, oldest first."""

    limit: int
    has_next_page: bool
    marker: str | None = None
    entries: list[ActionLogEntry]


class ActionError(_Doc):
    """Every error answer under ``/action-provider``, as the specification writes them."""

    code: str = Field(description="ActionNotFound, BadActionRequest, RequestValidationError, ...")
    description: str
