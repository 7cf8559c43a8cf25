"""The endpoint channel: the WebSocket between the broker and an endpoint's agent, and the task
batches queued for an endpoint in RabbitMQ (the same ``TaskMessage`` JSON).

Endpoint -> broker: ``Hello`` (first), ``Credit``, ``RunningFrame``, ``ResultsFrame``,
``HeartbeatFrame``. Broker -> endpoint: ``Welcome`` (first), ``TasksFrame``, ``ResultsAck``,
``CancelFrame``, ``ErrorFrame``, and to a multi-user endpoint's manager ``StartUserEndpoint``.
Payload fields (``function``, ``args``, ``data``) are opaque
strings made by :mod:`farcall.serialize`: the broker never looks inside them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from farcall.protocol.common import (
    PROTOCOL_VERSION,
    Attempt,
    Message,
    ResultFormat,
    SpecField,
    TaskState,
    Versions,
    as_bytes,
)

DATA_RETRY_SECONDS = 120.0
"""How long a worker retries a blob transfer by default (the endpoint's ``data_retry_seconds``)."""


class DataAccess(Message):
    """How a worker reaches the data plane: the broker URL the agent uses, its task's grant
    (``<endpoint id>:<task id>:<mac>``, derived by the agent from the ``Welcome``'s key: it
    allows uploads charged to the task's submitter and reading the task's argument blob,
    while the task runs, nothing else), the broker's per-task size limit, and how long a
    transfer is retried after it first fails (the endpoint's ``data_retry_seconds``; carried
    here, not in the environment, because Parsl workers may run on other nodes). The agent
    sets it on every task it hands to its engine."""

    url: str
    grant: str = ""
    max_task_bytes: int = 0
    retry_seconds: float = Field(default=DATA_RETRY_SECONDS, ge=0, allow_inf_nan=False)


class TaskMessage(Message):
    """A task as the endpoint receives it (also the body queued in RabbitMQ).

    ``function`` is empty when the function travels once per session in a
    ``TasksFrame``'s ``functions`` instead of with every task. A function body
    is therefore kept in these places, each for one reason (and nowhere else):

    - the SDK's ``Executor``: each function it was given, serialized and registered
      once (keyed by the function object), so a sweep serializes it once;
    - the broker's ``Services.functions``: function records by id for a few seconds,
      for the owner check of every submission and the body a session sends;
    - the broker's channel session: only the ids whose body it sent this session;
    - the agent: bodies by id (bounded LRU), since a task arrives without its body
      once the session has sent it;
    - each worker: deserialized functions by id (bounded LRU), so a function is
      loaded once per worker, not once per task.
    """

    task_id: str
    function_id: str
    function: str = ""
    args: str
    resource_specification: SpecField = None
    submitter: Versions | None = None
    user_id: str = ""
    """The id of the user who submitted it (set by the broker): a shared endpoint's engine never
    runs tasks of two users in one worker process. "" from brokers before it (one pool)."""
    walltime: float | None = None
    """Seconds it may run on a worker (the engine enforces it; ``TaskTimeout`` past it)."""
    max_retries: int = 0
    """Runs again after a lost worker (``WorkerLost``), up to this many times."""
    result_format: ResultFormat = "pickle"
    """How the worker serializes the return value (``json``: for the Action Provider API)."""
    data: DataAccess | None = None
    """Set by the agent (never queued): where the worker fetches a blob argument and uploads a
    result too big to travel inline."""


_TASK_LIST: TypeAdapter[list[TaskMessage]] = TypeAdapter(list[TaskMessage])


def dump_task_batch(tasks: list[TaskMessage]) -> bytes:
    """One queued message: a JSON array of tasks (the broker queues a submitted batch whole)."""
    return _TASK_LIST.dump_json(tasks)


def join_task_batch(task_jsons: list[str]) -> bytes:
    """A queued message from tasks already in ``TaskMessage`` JSON (same format as ``dump_task_batch``)."""
    return ("[" + ",".join(task_jsons) + "]").encode()


def parse_task_batch(raw: str | bytes) -> list[TaskMessage]:
    """The tasks of a queued message: a JSON array of tasks, or one task object (protocol v1)."""
    body = as_bytes(raw).lstrip()
    if body.startswith(b"{"):
        return [TaskMessage.model_validate_json(body)]
    return _TASK_LIST.validate_json(body)


class ResultMessage(Message):
    """The outcome of one task, produced by a worker and sent by the endpoint.

    ``data`` is the serialized return value on success, or the serialized
    remote exception on failure; ``error`` is a plain-text summary with the
    remote traceback, readable without deserializing anything.
    """

    task_id: str
    state: Literal[TaskState.SUCCESS, TaskState.FAILED]
    data: str = ""
    error: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    worker: Versions | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    """Earlier runs on this endpoint that a lost worker cut short (each retried)."""


_RESULT_LIST: TypeAdapter[list[ResultMessage]] = TypeAdapter(list[ResultMessage])


def dump_result_batch(results: list[ResultMessage]) -> str:
    """Results of a chunk of tasks run together, as one JSON array."""
    return _RESULT_LIST.dump_json(results).decode()


def parse_result_batch(raw: str | bytes) -> list[ResultMessage]:
    return _RESULT_LIST.validate_json(raw)


class Heartbeat(Message):
    workers: int = 0
    idle_workers: int = 0
    pending_tasks: int = 0
    running_tasks: int = 0
    engine: str = ""
    versions: Versions | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Hello(Message):
    """First frame from the endpoint: what it still holds, and how much it can take."""

    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    held_task_ids: list[str] = Field(default_factory=list)
    crashed_task_ids: list[str] = Field(default_factory=list)
    """Tasks a previous agent process had started when it died (from its journal): the
    broker counts such crashes per task and fails a task after ``max_endpoint_losses``."""
    credit: int = 0
    heartbeat: Heartbeat = Field(default_factory=Heartbeat)
    heartbeat_period: float | None = Field(default=None, gt=0)
    """Seconds between heartbeats; the broker calls the endpoint offline after a few missed."""
    multi_user: bool = False
    """The agent is a multi-user endpoint's manager: it runs no task itself (its credit stays 0)
    and starts a user endpoint, as the submitter's own Unix account, for each ``StartUserEndpoint``."""
    user_config_schema: dict[str, Any] | None = None
    """A manager's JSON Schema for the ``user_endpoint_config`` users send (its
    ``user_config_schema.json``): the broker checks every submission against it (422 when it does
    not hold). None: the manager checks nothing before rendering its template."""


class Welcome(Message):
    type: Literal["welcome"] = "welcome"
    protocol: int = PROTOCOL_VERSION
    endpoint_id: str
    max_frame_bytes: int = 0
    """Largest frame the broker reads from the endpoint (0: not said). The agent keeps every
    results frame under it and fails a result too big to fit, instead of sending it."""
    upload_grant: str = ""
    """The key (urlsafe base64) the agent derives each task's grant from
    (``farcall.blobs.task_grant``), which lets that task's worker upload its result blobs and
    download its argument blob while it runs (``X-Farcall-Grant``; "" from a broker without a
    data plane). Bound to the endpoint's credential: replacing it voids the key."""
    max_task_bytes: int = 0
    """Largest arguments or result of one task (``FARCALL_MAX_TASK_BYTES``; 0: not said)."""
    broker_id: str = ""
    """The broker deployment's identity (as ``GET /v1/health`` says it; "": not said), so an
    agent whose registration does not record it yet learns it."""


class Credit(Message):
    """The endpoint can take ``n`` more tasks than it asked for so far."""

    type: Literal["credit"] = "credit"
    n: int = Field(ge=0)


class TasksFrame(Message):
    """Tasks for the endpoint; ``functions`` holds the bodies (by function id) of functions
    this session has not sent before."""

    type: Literal["tasks"] = "tasks"
    tasks: list[TaskMessage]
    functions: dict[str, str] = Field(default_factory=dict)


def tasks_frame_json(task_jsons: list[str], functions: dict[str, str] | None = None) -> str:
    """``TasksFrame`` JSON from tasks already serialized, without parsing them again."""
    bodies = json.dumps(functions or {})
    return '{"type":"tasks","functions":' + bodies + ',"tasks":[' + ",".join(task_jsons) + "]}"


class RunningFrame(Message):
    """Tasks that a worker started, with the time each started."""

    type: Literal["running"] = "running"
    started: dict[str, float]


class ResultsFrame(Message):
    type: Literal["results"] = "results"
    results: list[ResultMessage]
    credit: int = Field(default=0, ge=0)


class ResultsAck(Message):
    """The broker stored these results; the endpoint may forget them."""

    type: Literal["results_ack"] = "results_ack"
    task_ids: list[str]


class CancelFrame(Message):
    """Broker -> endpoint: these tasks were cancelled; drop them if queued, stop them if running."""

    type: Literal["cancel"] = "cancel"
    task_ids: list[str]


class HeartbeatFrame(Message):
    type: Literal["heartbeat"] = "heartbeat"
    heartbeat: Heartbeat


class StartUserEndpoint(Message):
    """Broker -> a multi-user endpoint's manager: start (or keep running) the user endpoint
    ``endpoint_id`` for ``username`` with ``user_endpoint_config``; its tasks wait in its own
    queue meanwhile. The broker sends it when tasks wait for a user endpoint that has no session,
    again after ``START_RESEND_SECONDS`` while that lasts, so a lost one is repeated.

    ``credential`` is the user endpoint's own credential (the manager hands it to the child on a
    pipe); it is the same for every start of that user endpoint while the manager's own
    credential stays the same. ``identities`` are what the manager's identity mapping reads:
    each a dict with at least ``id`` (the farcall user id, also ``sub``) and ``username``.
    ``config_hash`` names the configuration (the SHA-256 of its canonical JSON): tasks with the
    same user and configuration share a user endpoint."""

    type: Literal["start_user_endpoint"] = "start_user_endpoint"
    endpoint_id: str
    credential: str
    user_id: str
    username: str
    identities: list[dict[str, Any]] = Field(default_factory=list)
    user_endpoint_config: dict[str, Any] = Field(default_factory=dict)
    config_hash: str = ""


START_RESEND_SECONDS = 30.0
"""How long the broker waits for a user endpoint it asked a manager to start before asking again."""


class ErrorFrame(Message):
    type: Literal["error"] = "error"
    message: str


EndpointFrame = Annotated[
    Hello | Credit | RunningFrame | ResultsFrame | HeartbeatFrame,
    Field(discriminator="type"),
]
BrokerFrame = Annotated[
    Welcome | TasksFrame | ResultsAck | CancelFrame | ErrorFrame | StartUserEndpoint,
    Field(discriminator="type"),
]


class _EndpointFrameBox(Message):
    frame: EndpointFrame


class _BrokerFrameBox(Message):
    frame: BrokerFrame


def parse_endpoint_frame(raw: str | bytes) -> Hello | Credit | RunningFrame | ResultsFrame | HeartbeatFrame:
    """Parse a frame sent by an endpoint (raises ``pydantic.ValidationError``)."""
    return _EndpointFrameBox.model_validate_json(b'{"frame":' + as_bytes(raw) + b"}").frame


def parse_broker_frame(
    raw: str | bytes,
) -> Welcome | TasksFrame | ResultsAck | CancelFrame | ErrorFrame | StartUserEndpoint:
    """Parse a frame sent by the broker to an endpoint."""
    return _BrokerFrameBox.model_validate_json(b'{"frame":' + as_bytes(raw) + b"}").frame

