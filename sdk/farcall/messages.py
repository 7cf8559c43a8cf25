"""Every message that crosses a process boundary, as one pydantic model each.

The SDK, the broker and the endpoint all import these; nobody assembles these
dicts by hand. Payload fields (``function``, ``args``, ``data``) are opaque
strings produced by :mod:`farcall.serialize`: the broker never looks inside them.

``PROTOCOL_VERSION`` is bumped on any incompatible change; peers send it in
``hello`` and refuse a version they do not speak.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

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


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Versions(_Msg):
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


# --------------------------------------------------------------------- REST bodies


ObjectId = Annotated[str, Field(min_length=1, max_length=64, description="an id the broker gave")]
"""Ids the broker hands out are UUIDs; anything longer is refused before it is looked up."""
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"
Username = Annotated[str, Field(pattern=USERNAME_PATTERN, description=(
    "a user's name on the broker: letters, digits and . _ @ + -, at most 64"))]


class FunctionRegistration(_Msg):
    function: str = Field(description="serialized function payload (farcall.serialize)")
    function_name: str = ""
    description: str = ""


class EndpointRegistration(_Msg):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""


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
    if spec is None:
        return None
    if _depth(spec, MAX_SPEC_DEPTH) > MAX_SPEC_DEPTH:
        raise ValueError(
            f"resource_specification is nested deeper than {MAX_SPEC_DEPTH} levels; "
            "flatten it (it holds scheduler options such as num_nodes, not data)")
    size = len(json.dumps(spec))
    if size > MAX_SPEC_BYTES:
        raise ValueError(
            f"resource_specification is {size} bytes as JSON, over the limit of {MAX_SPEC_BYTES}; "
            "pass data as arguments, not in the resource specification")
    return spec


SpecField = Annotated[dict[str, Any] | None, AfterValidator(check_resource_specification)]
WalltimeField = Annotated[float | None, Field(default=None, gt=0, le=MAX_WALLTIME, description=(
    "seconds the task may run on a worker; past it the task fails with TaskTimeout"))]
RetriesField = Annotated[int, Field(default=0, ge=0, le=MAX_RETRIES, description=(
    "times to run the task again when a system failure (a lost worker) cut it short"))]
ResultFormat = Literal["pickle", "json"]
"""How a worker serializes a task's return value: ``pickle`` (farcall.serialize.serialize, what
the SDK reads) or ``json`` (strategy 12, what the Action Provider API hands a flow; a value that
is not JSON fails the task)."""


class TaskSpec(_Msg):
    """One task inside a batch submission."""

    function_id: ObjectId
    args: str = Field(description="serialized (args, kwargs) payload")
    resource_specification: SpecField = None
    walltime: WalltimeField = None
    max_retries: RetriesField = 0
    result_format: ResultFormat = Field(default="pickle", description=(
        "how the worker serializes the return value: 'pickle' (what the SDK reads) or 'json' "
        "(a value that is not JSON fails the task)"))


class BatchSubmission(_Msg):
    endpoint_id: ObjectId
    tasks: list[TaskSpec] = Field(min_length=1)
    task_group_id: ObjectId | None = None
    submitter: Versions | None = None


class BatchSubmitted(_Msg):
    task_group_id: str
    task_ids: list[str]


class TaskIds(_Msg):
    task_ids: list[ObjectId] = Field(min_length=1, max_length=10_000)


class CancelRequest(_Msg):
    """``POST /v1/tasks/cancel``: stop these tasks. With ``only_queued`` a task that has
    started on a worker is left to finish (what ``TaskFuture.cancel`` asks for)."""

    task_ids: list[ObjectId] = Field(min_length=1, max_length=10_000)
    only_queued: bool = False


class TokenRequest(_Msg):
    """``POST /v1/tokens``: a new token for the caller, named so the user can tell tokens apart."""

    name: str = Field(default="", max_length=200)


class ShareRequest(_Msg):
    """``POST .../share`` and ``.../unshare``: with one user (by name) and, for a function,
    with every user (``public``)."""

    username: Username | None = None
    public: bool = False


# --------------------------------------------------------------------- REST answers


class ErrorBody(_Msg):
    """Every error answer: a stable code, a message that says what to fix, and for 422 the details."""

    error: str = Field(description="a stable code: invalid_request, unauthorized, not_found, ...")
    message: str
    detail: list[dict[str, Any]] | None = None
    retry_after: float | None = Field(
        default=None, description="with status 429: seconds to wait before sending it again "
        "(also the Retry-After header, in whole seconds)")


class Health(_Msg):
    """``ok`` when every backing service answers; ``unavailable`` (with HTTP 503) otherwise."""

    status: Literal["ok", "unavailable"]
    version: str
    services: dict[str, str] = Field(
        default_factory=dict, description="backing service -> 'ok' or why it is not answering")


class FunctionRegistered(_Msg):
    function_id: str


class FunctionInfo(_Msg):
    function_id: str
    function_name: str
    description: str
    function: str = Field(description="serialized function payload (farcall.serialize)")
    created_at: float
    role: Literal["owner", "shared"] = Field(
        default="owner", description="'owner', or 'shared' when another user shared it with you")
    public: bool = Field(default=False, description="every user may run it")


class FunctionSharing(_Msg):
    """Whom a function is shared with (only its owner sees this)."""

    function_id: str
    shared_with: list[str] = Field(description="user names, besides the owner")
    public: bool


class EndpointSharing(_Msg):
    """Whom an endpoint is shared with (only its owner sees this)."""

    endpoint_id: str
    shared_with: list[str] = Field(description="user names, besides the owner")


class FunctionDeleted(_Msg):
    function_id: str
    deleted: bool


class EndpointRegistered(_Msg):
    endpoint_id: str
    name: str
    credential: str = Field(description="the endpoint's credential, shown only this once")


class EndpointInfo(_Msg):
    endpoint_id: str
    name: str
    description: str
    status: Literal["online", "offline"]
    created_at: float
    last_heartbeat: float | None
    role: Literal["owner", "shared"] = Field(
        default="owner", description="'owner', or 'shared' when another user shared it with you")


class EndpointList(_Msg):
    endpoints: list[EndpointInfo]


class EndpointStatus(_Msg):
    """An endpoint's state and load, from its last heartbeat."""

    endpoint_id: str
    name: str
    status: Literal["online", "offline"]
    last_heartbeat: float | None
    workers: int
    idle_workers: int
    pending_tasks: int
    running_tasks: int
    queued_tasks: int = Field(description="tasks waiting in its queue, not yet taken by the endpoint")
    engine: str
    details: dict[str, Any]
    versions: Versions | None


class EndpointDeleted(_Msg):
    endpoint_id: str
    deleted: bool


class TokenCreated(_Msg):
    token_id: str
    token: str = Field(description="the token itself, shown only this once")
    name: str
    created_at: float


class TokenInfo(_Msg):
    """A token as listed: never the token itself."""

    token_id: str
    name: str
    created_at: float


class TokenList(_Msg):
    tokens: list[TokenInfo] = Field(description="oldest first")


class TokenRevoked(_Msg):
    token_id: str
    revoked: bool


class WhoAmI(_Msg):
    """``GET /v1/whoami``: the caller. ``identity_id`` is the user's stable id (a UUID): what
    ``creator_id``, ``manage_by`` and ``monitor_by`` of the Action Provider API name users by,
    as ``urn:globus:auth:identity:<identity_id>``."""

    username: str
    identity_id: str


class TaskGroupCreated(_Msg):
    task_group_id: str


class TaskGroupInfo(_Msg):
    task_group_id: str
    task_ids: list[str] = Field(description="in submission order")


class TaskGroupSummary(_Msg):
    """A task group as ``GET /v1/task_groups`` lists it."""

    task_group_id: str
    created_at: float
    last_active: float = Field(description="when a batch was last submitted to it")
    task_count: int


class TaskGroupList(_Msg):
    task_groups: list[TaskGroupSummary] = Field(description="the most recently active first")


class TaskSummary(_Msg):
    """A task as ``GET /v1/tasks`` lists it: where and what it ran, its state and times (no
    result: ``GET /v1/tasks/{task_id}`` has it). ``function_name`` is empty when the function
    is gone or no longer shared with you."""

    task_id: str
    task_group_id: str
    endpoint_id: str
    function_id: str
    function_name: str
    state: TaskState
    received_at: float | None
    completed_at: float | None


class TaskList(_Msg):
    tasks: list[TaskSummary] = Field(description="the most recently submitted first")


class Attempt(_Msg):
    """An earlier try of a task that a system failure cut short; the task ran again after it."""

    at: float
    error: str


class TasksCancelled(_Msg):
    cancelled: list[str] = Field(description="tasks now in state 'cancelled'")
    unchanged: dict[str, str] = Field(
        description="task id -> why it was not cancelled: its final state, 'running' "
        "(with only_queued), or 'not_found'")


class TaskInfo(_Msg):
    """A task as the REST API shows it. ``data`` and ``error`` appear once it is terminal,
    ``warnings`` when there is something to warn about (differing versions)."""

    task_id: str
    task_group_id: str
    endpoint_id: str
    function_id: str
    state: TaskState
    transitions: dict[str, float] = Field(description="state -> when the task entered it")
    completed_at: float | None
    submitter: Versions | None
    worker: Versions | None
    data: str | None = Field(
        default=None, description="the serialized result or remote exception (farcall.serialize)")
    error: str | None = Field(default=None, description="the remote error with its traceback, as text")
    attempts: list[Attempt] | None = Field(
        default=None, description="earlier tries cut short by a system failure, oldest first")
    warnings: list[str] | None = None


class TaskStatuses(_Msg):
    tasks: dict[str, TaskInfo] = Field(description="task id -> task; unknown or foreign ids left out")


# ---- the data plane (big arguments and results; broker/farcall/broker/blobs.py)


class Limits(_Msg):
    """What the broker takes, so the SDK can check a task before sending it
    (``GET /v1/limits``)."""

    max_task_bytes: int = Field(description=(
        "largest arguments or result of one task, in bytes (FARCALL_MAX_TASK_BYTES)"))
    max_payload_bytes: int = Field(description=(
        "largest request body other than a blob upload (FARCALL_MAX_PAYLOAD_BYTES)"))
    inline_bytes: int = Field(description=(
        "arguments and results up to this size travel inside the task; larger ones as blobs"))


class BlobCreated(_Msg):
    """A blob stored by ``POST /v1/blobs``: its id is what a reference payload names."""

    blob_id: str
    size: int


class DataAccess(_Msg):
    """How a worker reaches the data plane: the broker URL the agent uses, an upload grant the
    broker gave the endpoint (it allows blob uploads and downloads, nothing else), and the
    broker's per-task size limit. The agent sets it on every task it hands to its engine."""

    url: str
    grant: str = ""
    max_task_bytes: int = 0


# ---- timers


MIN_TIMER_INTERVAL = 1.0
"""Shortest interval between a timer's runs, in seconds (the broker looks for due timers a few
times a second)."""
MAX_TIMER_INTERVAL = 366 * 24 * 3600.0
MAX_TIMESTAMP = 253402300799.0
"""The last second of the year 9999: the latest ``start`` or ``stop_at`` a timer takes."""
MAX_TIMER_ARGS = 1024 * 1024
"""Largest arguments payload of a timer: it is stored with the timer and read at every run, so
large data travels by reference (a path, a URL) instead."""
TIMER_RUNS_KEPT = 100
"""Runs a timer keeps (the latest); ``run_count`` counts them all."""
TimerState = Literal["active", "paused", "finished", "stopped"]
"""``active`` (it runs at ``next_run``), ``paused``, ``finished`` (its schedule ended:
``stop_after_runs`` or ``stop_at`` reached) or ``stopped`` (by the broker, ``reason`` says why)."""
Timestamp = Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)]


class TimerSchedule(_Msg):
    """When a timer runs: every ``interval`` seconds from ``start``, or at the times a 5-field
    ``cron`` expression (UTC) names from ``start`` on; until ``stop_at`` or ``stop_after_runs``."""

    interval: float | None = Field(
        default=None, ge=MIN_TIMER_INTERVAL, le=MAX_TIMER_INTERVAL, allow_inf_nan=False,
        description="seconds between runs (at least 1); give this or cron")
    cron: str | None = Field(default=None, max_length=200, description=(
        "a 5-field cron expression (minute hour day-of-month month day-of-week), in UTC; "
        "give this or interval"))
    start: Timestamp | None = Field(default=None, description=(
        "seconds since the epoch of the first run (interval) or from which cron times count; "
        "default: when the timer is created"))
    stop_after_runs: int | None = Field(default=None, ge=1, le=1_000_000_000, description=(
        "the timer finishes after this many runs"))
    stop_at: Timestamp | None = Field(default=None, description=(
        "seconds since the epoch after which the timer does not run again"))

    @model_validator(mode="after")
    def _one_way(self) -> TimerSchedule:
        if (self.interval is None) == (self.cron is None):
            raise ValueError("give exactly one of interval (seconds between runs) or cron "
                             "(a 5-field cron expression)")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(
                f"cron {self.cron[:80]!r} has {len(self.cron.split())} fields; give 5: minute "
                "hour day-of-month month day-of-week, as in '*/5 * * * *'")
        if self.start is not None and self.stop_at is not None and self.stop_at <= self.start:
            raise ValueError("stop_at is not after start: the timer would never run")
        return self


class TimerRequest(TimerSchedule):
    """``POST /v1/timers``: run a registered function on an endpoint on a schedule. Each run is
    a task of the timer's creator, submitted as ``POST /v1/tasks`` submits one."""

    endpoint_id: ObjectId
    function_id: ObjectId
    args: str = Field(max_length=MAX_TIMER_ARGS, description=(
        "serialized (args, kwargs) payload (farcall.serialize.pack_args), the same every run"))
    name: str = Field(default="", max_length=200)
    submitter: Versions | None = None


class TimerCreated(_Msg):
    timer_id: str


class TimerRun(_Msg):
    """One run of a timer: when it fired and the task it submitted."""

    number: int = Field(description="1 for the timer's first run, 2 for the next, ...")
    at: float
    task_id: str | None = Field(default=None, description=(
        "the task this run submitted; null while it is being submitted or when it failed"))
    error: str | None = Field(default=None, description="why the run submitted no task")


class TimerInfo(_Msg):
    """A timer as the REST API shows it; ``runs`` (the latest ``TIMER_RUNS_KEPT``, oldest
    first) only with ``GET /v1/timers/{timer_id}``."""

    timer_id: str
    name: str
    endpoint_id: str
    function_id: str
    schedule: TimerSchedule
    state: TimerState
    reason: str | None = Field(default=None, description="why the broker stopped it")
    next_run: float | None = Field(description="when it runs next; null unless active")
    run_count: int = Field(description="how many times it ran")
    created_at: float
    runs: list[TimerRun] | None = None


class TimerList(_Msg):
    timers: list[TimerInfo] = Field(description="oldest first, without their runs")


class TimerDeleted(_Msg):
    timer_id: str
    deleted: bool


# ------------------------------------------------------------ broker <-> endpoint


class TaskMessage(_Msg):
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
    body = _b(raw).lstrip()
    if body.startswith(b"{"):
        return [TaskMessage.model_validate_json(body)]
    return _TASK_LIST.validate_json(body)


class ResultMessage(_Msg):
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


class Heartbeat(_Msg):
    workers: int = 0
    idle_workers: int = 0
    pending_tasks: int = 0
    running_tasks: int = 0
    engine: str = ""
    versions: Versions | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Hello(_Msg):
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


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    protocol: int = PROTOCOL_VERSION
    endpoint_id: str
    max_frame_bytes: int = 0
    """Largest frame the broker reads from the endpoint (0: not said). The agent keeps every
    results frame under it and fails a result too big to fit, instead of sending it."""
    upload_grant: str = ""
    """Lets this endpoint's workers upload result blobs and download argument blobs
    (``X-Farcall-Grant`` header; "" from a broker without a data plane)."""
    max_task_bytes: int = 0
    """Largest arguments or result of one task (``FARCALL_MAX_TASK_BYTES``; 0: not said)."""


class Credit(_Msg):
    """The endpoint can take ``n`` more tasks than it asked for so far."""

    type: Literal["credit"] = "credit"
    n: int = Field(ge=0)


class TasksFrame(_Msg):
    """Tasks for the endpoint; ``functions`` holds the bodies (by function id) of functions
    this session has not sent before."""

    type: Literal["tasks"] = "tasks"
    tasks: list[TaskMessage]
    functions: dict[str, str] = Field(default_factory=dict)


def tasks_frame_json(task_jsons: list[str], functions: dict[str, str] | None = None) -> str:
    """``TasksFrame`` JSON from tasks already serialized, without parsing them again."""
    bodies = json.dumps(functions or {})
    return '{"type":"tasks","functions":' + bodies + ',"tasks":[' + ",".join(task_jsons) + "]}"


class RunningFrame(_Msg):
    """Tasks that a worker started, with the time each started."""

    type: Literal["running"] = "running"
    started: dict[str, float]


class ResultsFrame(_Msg):
    type: Literal["results"] = "results"
    results: list[ResultMessage]
    credit: int = Field(default=0, ge=0)


class ResultsAck(_Msg):
    """The broker stored these results; the endpoint may forget them."""

    type: Literal["results_ack"] = "results_ack"
    task_ids: list[str]


class CancelFrame(_Msg):
    """Broker -> endpoint: these tasks were cancelled; drop them if queued, stop them if running."""

    type: Literal["cancel"] = "cancel"
    task_ids: list[str]


class HeartbeatFrame(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    heartbeat: Heartbeat


class ErrorFrame(_Msg):
    type: Literal["error"] = "error"
    message: str


EndpointFrame = Annotated[
    Hello | Credit | RunningFrame | ResultsFrame | HeartbeatFrame,
    Field(discriminator="type"),
]
BrokerFrame = Annotated[
    Welcome | TasksFrame | ResultsAck | CancelFrame | ErrorFrame,
    Field(discriminator="type"),
]


class _EndpointFrameBox(_Msg):
    frame: EndpointFrame


class _BrokerFrameBox(_Msg):
    frame: BrokerFrame


def parse_endpoint_frame(raw: str | bytes) -> Hello | Credit | RunningFrame | ResultsFrame | HeartbeatFrame:
    """Parse a frame sent by an endpoint (raises ``pydantic.ValidationError``)."""
    return _EndpointFrameBox.model_validate_json(b'{"frame":' + _b(raw) + b"}").frame


def parse_broker_frame(
    raw: str | bytes,
) -> Welcome | TasksFrame | ResultsAck | CancelFrame | ErrorFrame:
    """Parse a frame sent by the broker to an endpoint."""
    return _BrokerFrameBox.model_validate_json(b'{"frame":' + _b(raw) + b"}").frame


# ------------------------------------------------------------- broker -> client


class TaskResult(_Msg):
    """A finished task as the client sees it (pushed on the result stream)."""

    task_id: str
    state: TaskState
    data: str = ""
    error: str = ""
    completed_at: float | None = None
    worker: Versions | None = None
    attempts: list[Attempt] | None = None

    @classmethod
    def ended_by_broker(cls, task_id: str, state: TaskState, error: str, at: float) -> TaskResult:
        """A task the broker itself ended (failed or cancelled): no data, no worker."""
        return cls.model_construct(task_id=task_id, state=state, data="", error=error,
                                   completed_at=at, worker=None, attempts=None)

    @classmethod
    def stored(cls, result: ResultMessage, completed_at: float) -> TaskResult:
        """What the client sees of ``result`` once the broker stored it at ``completed_at``."""
        return cls.model_construct(
            task_id=result.task_id,
            state=TaskState(result.state),
            data=result.data,
            error=result.error,
            completed_at=completed_at,
            worker=result.worker,
            attempts=result.attempts or None,
        )


class ResultStreamFrame(_Msg):
    type: Literal["results"] = "results"
    results: list[TaskResult]


class SubmitFrame(_Msg):
    """Client -> broker on the result stream: a batch, as ``POST /v1/tasks`` takes it.

    Saves an HTTP request per batch; the answer is a ``SubmittedFrame`` or a
    ``RequestFailedFrame`` with the same ``request_id``.
    """

    type: Literal["submit"] = "submit"
    request_id: int
    batch: BatchSubmission


class SubmittedFrame(BatchSubmitted):
    type: Literal["submitted"] = "submitted"
    request_id: int


class RequestFailedFrame(_Msg):
    """The broker refused a ``SubmitFrame``: the HTTP status and error body it would have sent."""

    type: Literal["failed"] = "failed"
    request_id: int
    status: int
    error: str
    message: str
    retry_after: float | None = Field(
        default=None, description="with status 429: seconds to wait before sending it again")


StreamFrame = Annotated[
    ResultStreamFrame | SubmittedFrame | RequestFailedFrame, Field(discriminator="type")
]


class _StreamFrameBox(_Msg):
    frame: StreamFrame


def parse_stream_frame(raw: str | bytes) -> ResultStreamFrame | SubmittedFrame | RequestFailedFrame:
    """Parse a frame the broker sends on a result stream."""
    return _StreamFrameBox.model_validate_json(b'{"frame":' + _b(raw) + b"}").frame


def _b(raw: str | bytes) -> bytes:
    return raw.encode() if isinstance(raw, str) else raw
