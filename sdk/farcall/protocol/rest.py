"""The REST API's bodies: what the SDK sends (``/v1/...`` requests) and what the broker answers,
errors (``ErrorBody``) and the data plane's (``Limits``, ``BlobCreated``) included."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from farcall.protocol.common import (
    Attempt,
    Message,
    ObjectId,
    ResultFormat,
    RetriesField,
    SpecField,
    TaskState,
    UserConfigField,
    Username,
    Versions,
    WalltimeField,
)


class FunctionRegistration(Message):
    function: str = Field(description="serialized function payload (farcall.serialize)")
    function_name: str = ""
    description: str = ""


class EndpointRegistration(Message):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""


class TaskSpec(Message):
    """One task inside a batch submission."""

    function_id: ObjectId
    args: str = Field(description="serialized (args, kwargs) payload")
    resource_specification: SpecField = None
    walltime: WalltimeField = None
    max_retries: RetriesField = 0
    result_format: ResultFormat = Field(default="pickle", description=(
        "how the worker serializes the return value: 'pickle' (what the SDK reads) or 'json' "
        "(a value that is not JSON fails the task)"))


RequestId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")]


class BatchSubmission(Message):
    endpoint_id: ObjectId
    tasks: list[TaskSpec] = Field(min_length=1)
    task_group_id: ObjectId | None = None
    submitter: Versions | None = None
    request_id: RequestId | None = Field(default=None, description=(
        "the submitter's name for this submission, unique per user; the same request sent again "
        "(a retry after a lost answer) gets the same task ids and creates no tasks (kept as long "
        "as the results, FARCALL_RESULT_TTL)"))
    user_endpoint_config: UserConfigField = Field(default=None, description=(
        "for a multi-user endpoint: the values its administrator's template of the user "
        "endpoint's configuration takes (account, partition, image...), checked against the "
        "schema the endpoint published (422 when they do not fit). Tasks of one user with the "
        "same values share a user endpoint, run as that user's own account. Refused (422) for "
        "any other endpoint"))


class BatchSubmitted(Message):
    task_group_id: str
    task_ids: list[str]


class TaskIds(Message):
    task_ids: list[ObjectId] = Field(min_length=1, max_length=10_000)


class CancelRequest(Message):
    """``POST /v1/tasks/cancel``: stop these tasks. With ``only_queued`` a task that has
    started on a worker is left to finish (what ``TaskFuture.cancel`` asks for)."""

    task_ids: list[ObjectId] = Field(min_length=1, max_length=10_000)
    only_queued: bool = False


class TokenRequest(Message):
    """``POST /v1/tokens``: a new token for the caller, named so the user can tell tokens apart."""

    name: str = Field(default="", max_length=200)


class ShareRequest(Message):
    """``POST .../share`` and ``.../unshare``: with one user (by name) and, for a function,
    with every user (``public``)."""

    username: Username | None = None
    public: bool = False


# --------------------------------------------------------------------- REST answers


class ErrorBody(Message):
    """Every error answer: a stable code, a message that says what to fix, and for 422 the details."""

    error: str = Field(description="a stable code: invalid_request, unauthorized, not_found, ...")
    message: str
    detail: list[dict[str, Any]] | None = None
    retry_after: float | None = Field(
        default=None, description="with status 429: seconds to wait before sending it again "
        "(also the Retry-After header, in whole seconds)")


class Health(Message):
    """``ok`` when every backing service answers; ``unavailable`` (with HTTP 503) otherwise."""

    status: Literal["ok", "unavailable"]
    version: str
    services: dict[str, str] = Field(
        default_factory=dict, description="backing service -> 'ok' or why it is not answering")
    broker_id: str = Field(default="", description=(
        "this broker deployment's identity, the same on every replica: what an endpoint tells "
        "brokers apart by, whatever URL it reaches them at ('' while the store has not answered)"))


class FunctionRegistered(Message):
    function_id: str


class FunctionInfo(Message):
    function_id: str
    function_name: str
    description: str
    function: str = Field(description="serialized function payload (farcall.serialize)")
    created_at: float
    role: Literal["owner", "shared"] = Field(
        default="owner", description="'owner', or 'shared' when another user shared it with you")
    public: bool = Field(default=False, description="every user may run it")
    shared_by: str | None = Field(default=None, description=(
        "the user name of its owner, who shared it (None when it is yours)"))


class FunctionSharing(Message):
    """Whom a function is shared with (only its owner sees this)."""

    function_id: str
    shared_with: list[str] = Field(description="user names, besides the owner")
    public: bool


class EndpointSharing(Message):
    """Whom an endpoint is shared with (only its owner sees this)."""

    endpoint_id: str
    shared_with: list[str] = Field(description="user names, besides the owner")
    warning: str | None = Field(default=None, description=(
        "set when it is shared: what sharing this endpoint lets its users do (a single-user "
        "endpoint runs every task as its owner's account)"))


class EndpointLeft(Message):
    """``POST /v1/endpoints/{id}/leave``: an endpoint shared with you is no longer in your list."""

    endpoint_id: str
    left: bool


class FunctionLeft(Message):
    """``POST /v1/functions/{id}/leave``: a function shared with you by name is no longer yours to
    use."""

    function_id: str
    left: bool


class FunctionDeleted(Message):
    function_id: str
    deleted: bool


class EndpointRegistered(Message):
    endpoint_id: str
    name: str
    credential: str = Field(description="the endpoint's credential, shown only this once")
    broker_id: str = Field(default="", description=(
        "the identity of the broker deployment the endpoint is registered with (see Health)"))


class EndpointInfo(Message):
    endpoint_id: str
    name: str
    description: str
    status: Literal["online", "offline"]
    created_at: float
    last_heartbeat: float | None
    role: Literal["owner", "shared"] = Field(
        default="owner", description="'owner', or 'shared' when another user shared it with you")
    shared_by: str | None = Field(default=None, description=(
        "the user name of its owner, who shared it (None when it is yours)"))
    multi_user: bool = Field(default=False, description=(
        "a multi-user endpoint's manager: submit to it with user_endpoint_config, and your tasks "
        "run on a user endpoint it starts as your own account"))
    parent_id: str | None = Field(default=None, description=(
        "for a user endpoint: the multi-user endpoint that started it (None for any other)"))


class EndpointList(Message):
    endpoints: list[EndpointInfo]


class EndpointStatus(Message):
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
    multi_user: bool = Field(default=False, description="a multi-user endpoint's manager")
    parent_id: str | None = Field(default=None, description=(
        "for a user endpoint: the multi-user endpoint that started it (None for any other)"))


class CredentialIssued(Message):
    """``POST /v1/endpoints/{endpoint_id}/credential``: the endpoint's new credential."""

    endpoint_id: str
    credential: str = Field(description=(
        "the endpoint's new credential, shown only this once; the old one is refused from now on"))


class EndpointDeleted(Message):
    endpoint_id: str
    deleted: bool


class EndpointStopping(Message):
    """``POST /v1/endpoints/{id}/stop``: the endpoint was asked to stop (``stopping``), or was
    not connected (False: nothing to stop)."""

    endpoint_id: str
    stopping: bool


class TokenCreated(Message):
    token_id: str
    token: str = Field(description="the token itself, shown only this once")
    name: str
    created_at: float


class TokenInfo(Message):
    """A token as listed: never the token itself."""

    token_id: str
    name: str
    created_at: float


class TokenList(Message):
    tokens: list[TokenInfo] = Field(description="oldest first")


class TokenRevoked(Message):
    token_id: str
    revoked: bool


class WhoAmI(Message):
    """``GET /v1/whoami``: the caller. ``identity_id`` is the user's stable id (a UUID): what
    ``creator_id``, ``manage_by`` and ``monitor_by`` of the Action Provider API name users by,
    as ``urn:globus:auth:identity:<identity_id>``."""

    username: str
    identity_id: str


class TaskGroupCreated(Message):
    task_group_id: str


class TaskGroupInfo(Message):
    task_group_id: str
    task_ids: list[str] = Field(description="in submission order")


class TaskGroupSummary(Message):
    """A task group as ``GET /v1/task_groups`` lists it."""

    task_group_id: str
    created_at: float
    last_active: float = Field(description="when a batch was last submitted to it")
    task_count: int


class TaskGroupList(Message):
    task_groups: list[TaskGroupSummary] = Field(description="the most recently active first")


class TaskSummary(Message):
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


class TaskList(Message):
    tasks: list[TaskSummary] = Field(description="the most recently submitted first")



class TasksCancelled(Message):
    cancelled: list[str] = Field(description="tasks now in state 'cancelled'")
    unchanged: dict[str, str] = Field(
        description="task id -> why it was not cancelled: its final state, 'running' "
        "(with only_queued), or 'not_found'")


class TaskInfo(Message):
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


class TaskStatuses(Message):
    tasks: dict[str, TaskInfo] = Field(description="task id -> task; unknown or foreign ids left out")


# ---- the data plane (big arguments and results; broker/farcall/broker/routes/blobs.py)


class Limits(Message):
    """What the broker takes, so the SDK can check a task before sending it
    (``GET /v1/limits``)."""

    max_task_bytes: int = Field(description=(
        "largest arguments or result of one task, in bytes (FARCALL_MAX_TASK_BYTES)"))
    max_payload_bytes: int = Field(description=(
        "largest request body other than a blob upload (FARCALL_MAX_PAYLOAD_BYTES)"))
    inline_bytes: int = Field(description=(
        "arguments and results up to this size travel inside the task; larger ones as blobs"))


class BlobCreated(Message):
    """A blob stored by ``POST /v1/blobs``: its id is what a reference payload names."""

    blob_id: str
    size: int

