"""``Client``: the broker's REST API as Python calls, named as Globus Compute users know them.

Records come back as dicts whose ids are ``function_id``, ``endpoint_id``,
``task_id`` and ``task_group_id``. Every call raises a :class:`BrokerError`
subclass with the broker's message when the broker refuses it.
"""

from __future__ import annotations

import inspect
import json
import logging
import numbers
import re
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from pydantic import ValidationError

from farcall import blobs, compat, config
from farcall.errors import (
    BrokerError,
    TaskPending,
    TaskTooLarge,
    VersionMismatch,
    broker_error,
)
from farcall.outcome import outcome_of
from farcall.protocol.common import (
    MAX_RETRIES,
    MAX_WALLTIME,
    USERNAME_PATTERN,
    TaskState,
    Versions,
    check_resource_specification,
    check_user_endpoint_config,
)
from farcall.protocol.rest import (
    BatchSubmission,
    BatchSubmitted,
    CancelRequest,
    EndpointRegistration,
    FunctionRegistration,
    Limits,
    ShareRequest,
    TaskIds,
    TasksCancelled,
    TaskSpec,
    TokenRequest,
)
from farcall.protocol.timers import TimerRequest
from farcall.quietlog import QuietLog
from farcall.retry import RATE_WARNING_EVERY, RETRY_WARNING_EVERY, Retry, server_error
from farcall.retry import exchange as send_with_retry
from farcall.serialize import INLINE_BYTES, Frames, pack, serialize_function, serialize_source
from farcall.strategies import code_strategy_of
from farcall.transport import Response, Transport, TransportError
from farcall.urls import websocket_url
from farcall.version import __version__, local_versions

log = logging.getLogger(__name__)

SUBMITTER = Versions(**local_versions())
IDS_PER_REQUEST = 10_000
"""Most task ids the broker takes in one ``POST /v1/tasks/status`` or ``/v1/tasks/cancel``."""
MAX_BATCH_TASKS = 1024
MAX_BATCH_BYTES = 4 * 1024 * 1024
"""A batch is split below these, so a request stays well under the broker's body limit."""


def _rate_warning() -> QuietLog:
    """An Executor rate limited on every batch says so once a minute, not once per batch."""
    return QuietLog(log, RATE_WARNING_EVERY, logging.WARNING, rest=logging.DEBUG)


def _retry_warning() -> QuietLog:
    """Many requests retrying at once through one Client (an outage) say so every few seconds."""
    return QuietLog(log, RETRY_WARNING_EVERY, logging.WARNING, rest=logging.DEBUG)


class Batch:
    """Tasks to submit together with :meth:`Client.batch_run` (one request per ~1,000 tasks).

    ``resource_specification``, ``walltime`` and ``max_retries`` go with every task
    added (``add`` may set ``walltime`` and ``max_retries`` per task instead).
    ``user_endpoint_config``, for a multi-user endpoint, goes with the whole batch: the values
    its administrator's template takes (account, partition, ...), so the tasks run on the
    submitter's user endpoint for those values.
    """

    def __init__(
        self,
        task_group_id: str | uuid.UUID | None = None,
        resource_specification: dict[str, Any] | None = None,
        walltime: float | None = None,
        max_retries: int = 0,
        user_endpoint_config: dict[str, Any] | None = None,
    ) -> None:
        self.task_group_id = None if task_group_id is None else str(task_group_id)
        self.resource_specification = check_resource_specification(resource_specification)
        self.user_endpoint_config = check_user_endpoint_config(user_endpoint_config)
        self.walltime, self.max_retries = check_task_options(walltime, max_retries)
        self.tasks: list[TaskSpec] = []
        self.sizes: list[int] = []
        """Bytes of each task's arguments, serialized (what ``Limits.max_task_bytes`` applies to)."""
        self.blobs: dict[int, Frames] = {}
        """Arguments too big to travel inline, by task index: uploaded by ``batch_run``."""

    def add(
        self,
        function_id: str | uuid.UUID,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        walltime: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        """Add one call of a registered function (``Client.register_function``).

        ``walltime`` / ``max_retries``: for this task instead of the batch's (None: the batch's).
        """
        if isinstance(function_id, uuid.UUID):
            function_id = str(function_id)
        if not isinstance(function_id, str):
            raise TypeError(
                f"Batch.add takes a function_id string, got {type(function_id).__name__}; "
                "register the function first with Client.register_function"
            )
        if walltime is None and max_retries is None:
            own_walltime, own_retries = self.walltime, self.max_retries
        else:
            own_walltime, own_retries = check_task_options(
                self.walltime if walltime is None else walltime,
                self.max_retries if max_retries is None else max_retries,
            )
        payload, frames, size = pack_call(tuple(args or ()), dict(kwargs or {}))
        if frames is not None:
            self.blobs[len(self.tasks)] = frames
        self.sizes.append(size)
        self.tasks.append(
            TaskSpec.model_construct(
                function_id=function_id,
                args=payload,
                resource_specification=self.resource_specification,
                walltime=own_walltime,
                max_retries=own_retries,
            )
        )

    def __len__(self) -> int:
        return len(self.tasks)


class Client:
    """A connection to one broker as one user.

    ``broker_url`` and ``token`` default to ``FARCALL_BROKER_URL`` and
    ``FARCALL_TOKEN``, then to ``$FARCALL_HOME/config``. Thread-safe. Requests
    are retried for up to ``retry_seconds`` after their first failure while the
    broker does not answer or answers 503, so a broker restart does not fail a
    notebook cell, and, when the broker answers 429 (rate limited), for as long
    as it asks within that time; big arguments and results (the data plane) are
    also retried after any 5xx or a transfer cut short. ``retry_seconds``
    defaults to ``FARCALL_RETRY_SECONDS``, else 30: raise it for a long campaign
    that must ride out a longer broker outage (a bad value raises
    :class:`~farcall.errors.InvalidSetting`, a ``ValueError``).
    """

    def __init__(
        self,
        broker_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retry_seconds: float | None = None,
        do_version_check: bool = False,
        code_serialization_strategy: Any = None,
        environment: str | None = None,
        local_compute_services: bool | None = None,
        data_serialization_strategy: Any = None,
        app: Any = None,
        authorizer: Any = None,
        login_manager: Any = None,
        **kwargs: Any,
    ) -> None:
        """``do_version_check`` asks the broker's version at once (:meth:`version_check`);
        ``code_serialization_strategy`` (``farcall.serialize.DillCode()``...) is how
        :meth:`register_function` and Executors on this client send functions. The other
        Globus Compute arguments are accepted with a warning (:mod:`farcall.compat`), as is
        an unknown one (as Globus Compute does)."""
        compat.accept("Client", compat.CLIENT, {
            "environment": environment, "local_compute_services": local_compute_services,
            "data_serialization_strategy": data_serialization_strategy, "app": app,
            "authorizer": authorizer, "login_manager": login_manager})
        for name in kwargs:
            compat.warn_once(f"Client({name}=)", (
                f"Client({name}=...) is not an argument farcall knows, nor one of Globus Compute's "
                "current Client: it is ignored"))
        self.code_strategy = "auto" if code_serialization_strategy is None else code_strategy_of(
            code_serialization_strategy, "code_serialization_strategy")
        """How this client's functions are serialized (``farcall.serialize.STRATEGIES``)."""
        self.broker_url = config.broker_url(broker_url)
        self.token = config.token(token)
        self.retry_seconds = config.retry_seconds(retry_seconds)
        self._http = Transport(
            self.broker_url + "/v1",
            {"Authorization": f"Bearer {self.token}", "User-Agent": f"farcall/{__version__}",
             "Accept": "application/json"},
            timeout,
        )
        self._rate_warning = _rate_warning()
        self._retry_warning = _retry_warning()
        self._limits: Limits | None = None
        if do_version_check:
            self.version_check()

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(broker_url={self.broker_url!r})"

    def request(self, method: str, path: str, body: Any = None, content: bytes | None = None) -> Any:
        """One REST call; the decoded JSON answer, or a :class:`BrokerError`."""
        if body is not None:
            content = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if content is not None else None
        return _decode(self.exchange(lambda: self._http.request(method, path, content, headers)))

    def exchange(self, send: Callable[[], Response]) -> Response:
        """The answer of ``send`` (one HTTP request), made again while the broker cannot be
        reached, answers 503 or rate limits (429), within ``retry_seconds``."""
        return send_with_retry(send, self.retry(), self.broker_url, self._unreachable)

    def _data_exchange(self, send: Callable[[], Response]) -> Response:
        """``exchange`` for a blob transfer: also made again after any 5xx or a cut-off read."""
        return send_with_retry(send, self.retry(), self.broker_url, blobs.unreachable,
                               server_error)

    def _unreachable(self, e: TransportError) -> BrokerError:
        return BrokerError(
            0,
            f"cannot reach the broker at {self.broker_url} ({type(e).__name__}: {e}); "
            "check the URL and that the broker is running",
        )

    def retry(self) -> Retry:
        """A fresh retry budget of ``retry_seconds`` for one request (or one stream submission)."""
        return Retry(self.retry_seconds, self._rate_warning, self._retry_warning)

    def websocket_url(self, path: str) -> str:
        """``ws(s)://`` URL of a broker WebSocket route under ``/v1`` (see :mod:`farcall.urls`)."""
        return websocket_url(self.broker_url, path)

    # ---------------------------------------------------------------- data plane

    def limits(self) -> Limits:
        """What the broker takes (``GET /v1/limits``): asked once per Client, then kept."""
        if self._limits is None:
            self._limits = Limits.model_validate(self.request("GET", "/limits"))
        return self._limits

    def version_check(self, endpoint_version: str | None = None) -> None:
        """Raise :class:`~farcall.errors.VersionMismatch` if the broker (and, given its farcall
        version, an endpoint) runs a release this SDK cannot work with: another major version
        (another minor one before 1.0). ``GET /v1/health`` answers without a token."""
        broker = str(self.request("GET", "/health").get("version", ""))
        for side, version in (("the broker", broker), ("the endpoint", endpoint_version)):
            if version and _series(version) != _series(__version__):
                raise VersionMismatch(
                    f"{side} runs farcall {version} and this SDK is farcall {__version__}: they "
                    f"cannot work together. Install the SDK of the same release here "
                    f"(pip install 'farcall=={version}'), or ask the operator to upgrade")

    def upload_blob(self, frames: Frames, what: str = "the task") -> str:
        """Store big arguments (``serialize.pack``) on the broker's data plane; the reference
        payload to send as a task's ``args``. ``TaskTooLarge`` (naming ``what``) past
        ``limits().max_task_bytes``, before anything is sent."""
        check_task_size(frames.nbytes, self.limits().max_task_bytes, what)
        return blobs.upload(self._http, frames, exchange=self._data_exchange)

    def download_blob(self, ref: str) -> memoryview:
        """The blob a reference payload (a big result) names; ``DataExpired`` once it expired."""
        return blobs.download(self._http, ref, exchange=self._data_exchange)

    # ---------------------------------------------------------------- functions

    def register_function(
        self,
        function: Callable[..., Any],
        function_name: str | None = None,
        description: str | None = None,
        strategy: str | None = None,
        *,
        public: bool = False,
        metadata: dict[str, Any] | None = None,
        group: str | None = None,
        searchable: bool | None = None,
        ha_endpoint_id: str | None = None,
        container_uuid: str | None = None,
    ) -> str:
        """Serialize ``function`` and register it; its id.

        ``strategy``: ``"auto"`` (cloudpickle, then dill, then its source), one of those
        three, or None for this client's ``code_strategy``. ``description`` defaults to the
        function's docstring. ``public`` shares it with every user at once
        (:meth:`share_function`). The other Globus Compute arguments are accepted with a warning
        (:mod:`farcall.compat`).
        """
        compat.accept("Client.register_function", compat.REGISTER, {
            "metadata": metadata, "group": group, "searchable": searchable,
            "ha_endpoint_id": ha_endpoint_id, "container_uuid": container_uuid})
        payload = serialize_function(function, strategy or self.code_strategy)
        if description is None:
            description = inspect.getdoc(function) or ""
        function_id = self.register_function_payload(
            payload, function_name or str(getattr(function, "__name__", "")), description
        )
        if public:
            self.share_function(function_id, public=True)
        return function_id

    def register_source_code(self, source: str, function_name: str, description: str = "",
                             **register_kwargs: Any) -> str:
        """Register the function ``function_name`` defined in the Python ``source`` text (run
        as a module on the worker); its id. ``register_kwargs`` as :meth:`register_function`."""
        function_id = self.register_function_payload(
            serialize_source(source, function_name), function_name, description)
        if register_kwargs.pop("public", False):
            self.share_function(function_id, public=True)
        compat.accept("Client.register_source_code", compat.REGISTER, register_kwargs)
        return function_id

    def register_function_payload(
        self, payload: str, function_name: str = "", description: str = ""
    ) -> str:
        """Register an already serialized function (``farcall.serialize.serialize_function``)."""
        body = FunctionRegistration(
            function=payload, function_name=function_name, description=description
        )
        return str(self.request("POST", "/functions", body.model_dump())["function_id"])

    def get_function(self, function_id: str) -> dict[str, Any]:
        """``function_id``, ``function_name``, ``description`` and the serialized ``function``."""
        return dict(self.request("GET", f"/functions/{function_id}"))

    def delete_function(self, function_id: str) -> dict[str, Any]:
        """Delete your function: it can no longer be run. ``{"function_id", "deleted"}``."""
        return dict(self.request("DELETE", f"/functions/{function_id}"))

    def share_function(
        self, function_id: str, username: str | None = None, public: bool = False
    ) -> dict[str, Any]:
        """Let user ``username``, or with ``public`` every user, run your function and read it.

        The answer is its sharing: ``{"function_id", "shared_with": [user names], "public"}``.
        They see only their own tasks of it; only you may change, share or delete it.
        """
        body = _share_request("share_function", username, public, allow_public=True)
        return dict(self.request("POST", f"/functions/{function_id}/share", body))

    def unshare_function(
        self, function_id: str, username: str | None = None, public: bool = False
    ) -> dict[str, Any]:
        """Stop sharing your function with ``username`` (and, with ``public``, with every user);
        the answer is its sharing as :meth:`share_function` gives it."""
        body = _share_request("unshare_function", username, public, allow_public=True)
        return dict(self.request("POST", f"/functions/{function_id}/unshare", body))

    def leave_function(self, function_id: str) -> dict[str, Any]:
        """Stop using a function another user shared with you by name (a public one cannot be
        left). ``{"function_id", "left": True}``."""
        return dict(self.request("POST", f"/functions/{function_id}/leave"))

    def get_function_sharing(self, function_id: str) -> dict[str, Any]:
        """Whom your function is shared with: ``{"function_id", "shared_with", "public"}``."""
        return dict(self.request("GET", f"/functions/{function_id}/sharing"))

    # ---------------------------------------------------------------- endpoints

    def register_endpoint(self, name: str, description: str = "") -> dict[str, Any]:
        """Register an endpoint; the answer holds its ``credential``, shown only this once.

        Operators normally let ``farcall-endpoint start`` do this.
        """
        body = EndpointRegistration(name=name, description=description)
        return dict(self.request("POST", "/endpoints", body.model_dump()))

    def get_endpoints(self, role: str | None = None) -> list[dict[str, Any]]:
        """Your endpoints and those shared with you: ``endpoint_id``, ``name``, ``status``
        (online/offline), ``role`` (``owner`` or ``shared``), ... With ``role="owner"`` only
        yours (``"any"`` or None: all)."""
        if role not in (None, "any", "owner", "shared"):
            raise ValueError(f"get_endpoints: role must be 'owner', 'shared' or 'any', got {role!r}")
        found = list(self.request("GET", "/endpoints")["endpoints"])
        return found if role in (None, "any") else [e for e in found if e.get("role") == role]

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """The endpoint as :meth:`get_endpoints` lists it (also ``get_endpoint_metadata``)."""
        return dict(self.request("GET", f"/endpoints/{endpoint_id}"))

    get_endpoint_metadata = get_endpoint

    def stop_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Ask your endpoint's agent to stop: it takes no new task, lets running ones finish
        (its ``stop_timeout``), sends their results and exits; tasks submitted meanwhile wait
        in its queue until it is started again (``farcall-endpoint start NAME``).
        ``{"endpoint_id", "stopping"}``: ``stopping`` is False when it was not connected."""
        return dict(self.request("POST", f"/endpoints/{endpoint_id}/stop"))

    def get_endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        """``status`` plus workers, idle workers, pending/running/queued tasks and engine details."""
        return dict(self.request("GET", f"/endpoints/{endpoint_id}/status"))

    def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Delete the endpoint and its queue; its credential stops working at once."""
        return dict(self.request("DELETE", f"/endpoints/{endpoint_id}"))

    def rotate_endpoint_credential(self, endpoint_id: str) -> str:
        """Give your endpoint a new credential and return it (shown only this once): the old one
        is refused from now on, and the endpoint's sessions opened with it end. Store the new
        one where the agent reads it; ``farcall-endpoint rotate-credential NAME`` does both."""
        answer = self.request("POST", f"/endpoints/{endpoint_id}/credential")
        return str(answer["credential"])

    def share_endpoint(self, endpoint_id: str, username: str) -> dict[str, Any]:
        """Let user ``username`` submit tasks to your endpoint and read its status.

        The answer is its sharing: ``{"endpoint_id", "shared_with": [user names], "warning"}``.
        Its ``allowed_functions`` still apply to them; only you may change, share or delete it,
        and each user sees only the tasks they submitted. A single-user endpoint runs every task
        as your Unix account, so they can act as you there and see each other's work on it: the
        broker's ``warning`` says so, raised here as a ``UserWarning``. A multi-user endpoint
        (once its manager has connected) runs each user's tasks as their own account: no warning.
        """
        body = _share_request("share_endpoint", username, False, allow_public=False)
        answer = dict(self.request("POST", f"/endpoints/{endpoint_id}/share", body))
        if answer.get("warning"):
            warnings.warn(answer["warning"], UserWarning, stacklevel=2)
        return answer

    def unshare_endpoint(self, endpoint_id: str, username: str) -> dict[str, Any]:
        """Stop sharing your endpoint with ``username``: the broker refuses their submissions at
        once, and cancels the tasks they have waiting or running there (their futures raise
        ``CancelledError`` saying so). The answer is its sharing."""
        body = _share_request("unshare_endpoint", username, False, allow_public=False)
        return dict(self.request("POST", f"/endpoints/{endpoint_id}/unshare", body))

    def leave_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Remove an endpoint another user shared with you from your list: you can no longer
        submit to it, and your tasks waiting or running there are cancelled.
        ``{"endpoint_id", "left": True}``."""
        return dict(self.request("POST", f"/endpoints/{endpoint_id}/leave"))

    def get_endpoint_sharing(self, endpoint_id: str) -> dict[str, Any]:
        """Whom your endpoint is shared with: ``{"endpoint_id", "shared_with"}``."""
        return dict(self.request("GET", f"/endpoints/{endpoint_id}/sharing"))

    # ---------------------------------------------------------------- tokens

    def create_token(self, name: str = "") -> dict[str, Any]:
        """A new token for you: ``{"token_id", "token", "name", "created_at"}``.

        ``token`` is shown only this once. One token per machine or notebook lets you
        revoke one (:meth:`revoke_token`) without stopping the others.
        """
        body = TokenRequest(name=name)
        return dict(self.request("POST", "/tokens", body.model_dump()))

    def list_tokens(self) -> list[dict[str, Any]]:
        """Your tokens, oldest first: ``token_id``, ``name``, ``created_at`` (never the token)."""
        return list(self.request("GET", "/tokens")["tokens"])

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        """Revoke one of your tokens (this client's own too): the broker refuses it within a
        second, and closes the result streams opened with it. ``{"token_id", "revoked"}``."""
        return dict(self.request("DELETE", f"/tokens/{token_id}"))

    def whoami(self) -> dict[str, Any]:
        """You, as the broker knows you: ``{"username", "identity_id"}``. Flows name you by
        ``urn:globus:auth:identity:<identity_id>`` (an action's ``creator_id``, and whom its
        ``manage_by`` and ``monitor_by`` grant rights)."""
        return dict(self.request("GET", "/whoami"))

    # ---------------------------------------------------------------- tasks

    def create_task_group(self) -> str:
        return str(self.request("POST", "/task_groups", {})["task_group_id"])

    def get_task_group(self, task_group_id: str) -> list[str]:
        """The ids of the tasks in a group, in submission order."""
        return list(self.request("GET", f"/task_groups/{task_group_id}")["task_ids"])

    def list_task_groups(self, limit: int = 20) -> list[dict[str, Any]]:
        """Your task groups, the most recently submitted to first (at most ``limit``, up to
        1,000): ``task_group_id``, ``created_at``, ``last_active``, ``task_count``. An earlier
        Executor's group is how to come back to its tasks (``Executor.reload_tasks``)."""
        query = urlencode({"limit": limit})
        return list(self.request("GET", f"/task_groups?{query}")["task_groups"])

    def list_tasks(self, task_group_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Your most recently submitted tasks (of one group, with ``task_group_id``), newest
        first, at most ``limit`` (up to 1,000): ``task_id``, ``task_group_id``, ``endpoint_id``,
        ``function_id``, ``function_name``, ``state``, ``received_at``, ``completed_at``. No
        results: ask :meth:`get_result` for those."""
        params: dict[str, Any] = {"limit": limit}
        if task_group_id is not None:
            params["task_group_id"] = task_group_id
        return list(self.request("GET", f"/tasks?{urlencode(params)}")["tasks"])

    def run(
        self,
        *args: Any,
        endpoint_id: str,
        function_id: str,
        resource_specification: dict[str, Any] | None = None,
        walltime: float | None = None,
        max_retries: int = 0,
        user_endpoint_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Run a registered function once with ``args``/``kwargs``; the new task's id.

        ``walltime``: seconds the task may run on a worker (past it, it fails with
        :class:`~farcall.errors.TaskTimeout`); ``max_retries``: times it is run again
        when a system failure (a lost worker) cuts it short; ``user_endpoint_config``: for a
        multi-user endpoint, the values of your user endpoint's configuration.
        """
        batch = self.create_batch(resource_specification=resource_specification,
                                  walltime=walltime, max_retries=max_retries,
                                  user_endpoint_config=user_endpoint_config)
        batch.add(str(function_id), args, kwargs)
        return str(self.batch_run(endpoint_id, batch)["task_ids"][0])

    def get_worker_hardware_details(self, endpoint_id: str) -> str:
        """Run a report of a worker's machine (host, CPUs, memory, accelerators) on the endpoint;
        the task's id (its result is the report: :meth:`get_result`)."""
        from farcall.hardware import hardware_report

        return self.run(endpoint_id=endpoint_id, function_id=self.register_function(hardware_report))

    def create_batch(
        self,
        task_group_id: str | uuid.UUID | None = None,
        resource_specification: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        create_websocket_queue: bool | None = None,
        result_serializers: Any = None,
        *,
        walltime: float | None = None,
        max_retries: int = 0,
    ) -> Batch:
        """An empty :class:`Batch`; the options go with every task added to it
        (``user_endpoint_config``: for a multi-user endpoint, see :class:`Batch`). The
        arguments and their order are Globus Compute's; ``create_websocket_queue`` and
        ``result_serializers`` are accepted with a warning (:mod:`farcall.compat`)."""
        compat.accept("Client.create_batch", compat.BATCH, {
            "create_websocket_queue": create_websocket_queue or None,
            "result_serializers": result_serializers})
        return Batch(task_group_id, resource_specification, walltime=walltime,
                     max_retries=max_retries, user_endpoint_config=user_endpoint_config)

    def batch_run(self, endpoint_id: str | uuid.UUID, batch: Batch) -> dict[str, Any]:
        """Submit a batch; ``{"request_id", "task_group_id", "endpoint_id", "task_ids", "tasks"}``.

        ``task_ids`` follows the order of ``batch.add`` calls; ``tasks`` maps each
        function id to its task ids (as Globus Compute's ``batch_run`` does). ``request_id``
        names the (first) submission: sent again, it creates no tasks twice.
        """
        if not batch.tasks:
            raise ValueError("the batch is empty; add tasks with batch.add(function_id, args)")
        endpoint_id = str(endpoint_id)
        self._upload_arguments(batch)
        group = batch.task_group_id
        task_ids: list[str] = []
        request_ids: list[str] = []
        for chunk in split_batch(batch.tasks):
            request_ids.append(new_request_id())
            answer = self.submit_tasks(endpoint_id, chunk, group, request_ids[-1],
                                       user_endpoint_config=batch.user_endpoint_config)
            group = answer.task_group_id
            task_ids += answer.task_ids
        by_function: dict[str, list[str]] = {}
        for spec, task_id in zip(batch.tasks, task_ids, strict=True):
            by_function.setdefault(spec.function_id, []).append(task_id)
        return {
            "request_id": request_ids[0],
            "task_group_id": group,
            "endpoint_id": endpoint_id,
            "task_ids": task_ids,
            "tasks": by_function,
        }

    def _upload_arguments(self, batch: Batch) -> None:
        """Check every task's size against the broker's limit (``TaskTooLarge`` naming the first
        too big, before anything is sent), then upload the big arguments as blobs. Inline
        arguments are under any limit (the broker takes at least ``INLINE_BYTES``)."""
        if not batch.blobs:
            return
        limit = self.limits().max_task_bytes
        for index, size in enumerate(batch.sizes):
            check_task_size(size, limit, f"task {index} of the batch")
        for index in sorted(batch.blobs):
            batch.tasks[index].args = self.upload_blob(batch.blobs.pop(index))

    def submit_tasks(
        self, endpoint_id: str, tasks: list[TaskSpec], task_group_id: str | None = None,
        request_id: str | None = None, user_endpoint_config: dict[str, Any] | None = None,
    ) -> BatchSubmitted:
        """One ``POST /v1/tasks``; callers keep it under the body limit (see :func:`split_batch`).

        The submission goes under ``request_id`` (a new one if None): sent again after its
        answer was lost (a retry), the broker answers with the same tasks and creates none.
        """
        body = BatchSubmission.model_construct(
            endpoint_id=endpoint_id, tasks=tasks, task_group_id=task_group_id, submitter=SUBMITTER,
            request_id=request_id or new_request_id(),
            user_endpoint_config=check_user_endpoint_config(user_endpoint_config))
        answer = self.request("POST", "/tasks", content=body.model_dump_json().encode())
        return BatchSubmitted.model_validate(answer)

    def get_task(self, task_id: str) -> dict[str, Any]:
        """The task record: ``state``, ``transitions`` (state -> timestamp), versions, ...; with
        Globus Compute's keys too: ``task_id``, ``pending``, ``status`` (the state) and, once
        finished, ``completion_t`` and ``result`` or ``exception`` (as
        :meth:`get_batch_result` gives them)."""
        record = self._task_record(task_id)
        return {**record, **self._outcome_keys(record)}

    def _task_record(self, task_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/tasks/{task_id}"))

    def _outcome_keys(self, record: dict[str, Any]) -> dict[str, Any]:
        """Globus Compute's view of a task record: ``task_id``, ``pending``, ``status`` and, once
        finished, ``completion_t`` and ``result`` or ``exception`` (a cancelled task's is a
        ``CancelledError``)."""
        pending = not TaskState(record["state"]).terminal
        keys: dict[str, Any] = {"task_id": record.get("task_id"), "pending": pending,
                                "status": record["state"]}
        if not pending:
            outcome = outcome_of(record, self.download_blob)
            keys["result" if outcome.ok else "exception"] = outcome.value
            keys["completion_t"] = record.get("completed_at")
        return keys

    def get_result(self, task_id: str) -> Any:
        """The task's return value; raises its remote exception, ``concurrent.futures.CancelledError``
        if it was cancelled, or ``TaskPending`` if unfinished."""
        record = self._task_record(task_id)
        if not TaskState(record["state"]).terminal:
            raise TaskPending(task_id, record["state"])
        return outcome_of(record, self.download_blob).unwrap()  # cancelled: CancelledError

    def get_tasks(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Records of many tasks, in requests of up to 10,000; unknown or foreign ids are left out."""
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), IDS_PER_REQUEST):
            body = TaskIds(task_ids=ids[i : i + IDS_PER_REQUEST])
            found.update(self.request("POST", "/tasks/status", body.model_dump())["tasks"])
        return found

    def cancel(self, task_ids: str | Iterable[str], *, only_queued: bool = False) -> dict[str, Any]:
        """Cancel tasks: queued ones never run, running ones are stopped; each ends ``cancelled``.

        A running task's worker process is killed (or its thread abandoned and
        replaced). With ``only_queued`` tasks that have started are left to finish.
        The answer is ``{"cancelled": [task ids], "unchanged": {task id: why}}``,
        ``why`` being a finished task's state, ``"running"`` (``only_queued``) or
        ``"not_found"``. In requests of up to 10,000 ids.
        """
        ids = [task_ids] if isinstance(task_ids, str) else list(dict.fromkeys(task_ids))
        cancelled: list[str] = []
        unchanged: dict[str, str] = {}
        for i in range(0, len(ids), IDS_PER_REQUEST):
            body = CancelRequest(task_ids=ids[i : i + IDS_PER_REQUEST], only_queued=only_queued)
            answer = TasksCancelled.model_validate(
                self.request("POST", "/tasks/cancel", body.model_dump(exclude_defaults=True))
            )
            cancelled += answer.cancelled
            unchanged.update(answer.unchanged)
        return {"cancelled": cancelled, "unchanged": unchanged}

    def get_batch_result(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per task id: ``pending``, ``status`` and, once finished, ``result`` or ``exception``.

        A cancelled task has ``status`` ``"cancelled"`` and a ``CancelledError`` as ``exception``.

        Ids the broker does not know (never submitted, someone else's, or expired)
        are left out of the answer.
        """
        out: dict[str, dict[str, Any]] = {}
        for task_id, record in self.get_tasks(map(str, task_ids)).items():
            entry = self._outcome_keys(record)
            del entry["task_id"]
            out[task_id] = entry
        return out

    # ---------------------------------------------------------------- timers

    def create_timer(
        self,
        endpoint_id: str,
        function_id: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        interval: float | None = None,
        cron: str | None = None,
        start: datetime | float | None = None,
        stop_after_runs: int | None = None,
        stop_at: datetime | float | None = None,
        name: str | None = None,
    ) -> str:
        """Run a registered function on an endpoint on a schedule, as your task each time; the
        new timer's id.

        Give exactly one of ``interval`` (seconds between runs, at least 1; the first run at
        ``start``, default now) or ``cron`` (a 5-field cron expression, in UTC, such as
        ``"0 2 * * *"``: every night at 02:00). ``start`` and ``stop_at`` are datetimes (a naive
        one is local time) or seconds since the epoch; the timer finishes after
        ``stop_after_runs`` runs, or once the next run would be after ``stop_at``. A run whose
        time passed while no broker was up fires once when one is back. The timer stops (with
        a ``reason``) if the endpoint or function is deleted or no longer shared with you.
        """
        if (interval is None) == (cron is None):
            raise ValueError("create_timer: give exactly one of interval= (seconds between runs) "
                             "or cron= (a 5-field cron expression such as '0 2 * * *')")
        payload, blob, size = pack_call(tuple(args), dict(kwargs or {}))
        if blob is not None:
            raise ValueError(
                f"create_timer: the arguments are {_size(size)} serialized; a timer keeps its "
                f"arguments for as long as it runs, up to {_size(INLINE_BYTES)}: pass the path or "
                "URL of the data instead, and read it in the function")
        try:
            body = TimerRequest(
                endpoint_id=endpoint_id, function_id=function_id,
                args=payload, interval=interval, cron=cron,
                start=_epoch(start, "start"), stop_after_runs=stop_after_runs,
                stop_at=_epoch(stop_at, "stop_at"), name=name or "", submitter=SUBMITTER)
        except ValidationError as e:
            problem = e.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            what = str(problem["msg"]).removeprefix("Value error, ")
            raise ValueError(f"create_timer: {where + ': ' if where else ''}{what}") from None
        answer = self.request("POST", "/timers",
                              content=body.model_dump_json(exclude_none=True).encode())
        return str(answer["timer_id"])

    def list_timers(self) -> list[dict[str, Any]]:
        """Your timers, oldest first: ``timer_id``, ``name``, ``schedule``, ``state`` (active,
        paused, finished, stopped), ``reason``, ``next_run``, ``run_count``, ... (no runs)."""
        return list(self.request("GET", "/timers")["timers"])

    def get_timer(self, timer_id: str) -> dict[str, Any]:
        """The timer as :meth:`list_timers` shows it, with ``runs``: its latest runs (up to
        100, oldest first), each ``{"number", "at", "task_id"}`` (``error`` instead of a task
        when the run could not submit one). Read a run's result with ``get_result(task_id)``."""
        return dict(self.request("GET", f"/timers/{timer_id}"))

    def pause_timer(self, timer_id: str) -> dict[str, Any]:
        """Stop the timer running until :meth:`resume_timer`; the timer."""
        return dict(self.request("POST", f"/timers/{timer_id}/pause"))

    def resume_timer(self, timer_id: str) -> dict[str, Any]:
        """Run the timer again from the next time of its schedule (runs it would have had while
        paused are skipped); the timer."""
        return dict(self.request("POST", f"/timers/{timer_id}/resume"))

    def delete_timer(self, timer_id: str) -> dict[str, Any]:
        """Delete the timer; the tasks it submitted stay. ``{"timer_id", "deleted"}``."""
        return dict(self.request("DELETE", f"/timers/{timer_id}"))


# ------------------------------------------------------------------ helpers


def _series(version: str) -> tuple[str, ...]:
    """The part of a version that must match for two releases to work together: the major
    version (and the minor one before 1.0, as semantic versioning has it)."""
    parts = version.split(".")
    return tuple(parts[:2]) if parts[0] == "0" else tuple(parts[:1])


def new_request_id() -> str:
    """A submission's name, unique per user: what makes a retried submission create its tasks
    once (``BatchSubmission.request_id``)."""
    return uuid.uuid4().hex


def _epoch(when: datetime | float | None, what: str) -> float | None:
    """A time the caller gave as a datetime or as seconds since the epoch, as the latter."""
    if when is None:
        return None
    if isinstance(when, datetime):
        return when.timestamp()
    if isinstance(when, numbers.Real) and not isinstance(when, bool):
        return float(when)
    raise ValueError(
        f"create_timer: {what} must be a datetime or seconds since the epoch, got {when!r:.80}")


def check_task_options(walltime: float | None, max_retries: int) -> tuple[float | None, int]:
    """``(walltime, max_retries)`` as every task carries them, checked where the user passed
    them (the broker would refuse them only at submission)."""
    if walltime is not None:
        number = isinstance(walltime, numbers.Real) and not isinstance(walltime, bool)
        if not number or not 0 < walltime <= MAX_WALLTIME:
            raise ValueError(
                f"walltime must be a number of seconds above 0 and at most {MAX_WALLTIME:.0f} "
                f"(a year), got {walltime!r}; pass walltime=None for no limit"
            )
        walltime = float(walltime)
    whole = isinstance(max_retries, numbers.Integral) and not isinstance(max_retries, bool)
    if not whole or not 0 <= max_retries <= MAX_RETRIES:
        raise ValueError(
            f"max_retries must be a whole number from 0 to {MAX_RETRIES}, got {max_retries!r}: "
            "the times a task is run again after a lost worker cut it short (default 0)"
        )
    return walltime, int(max_retries)


def pack_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Frames | None, int]:
    """A call's arguments pickled once: ``(inline payload, None, size)`` up to
    ``INLINE_BYTES``, else ``("", frames, size)`` to upload as a blob (``Client.upload_blob``);
    ``size`` is what ``Limits.max_task_bytes`` applies to."""
    frames = pack((args, kwargs))
    size = frames.nbytes
    if size <= INLINE_BYTES:
        return frames.payload(), None, size
    return "", frames, size


def check_task_size(size: int, limit: int, what: str = "the task") -> None:
    """``TaskTooLarge`` when a task's serialized arguments (``size`` bytes) are over the broker's
    ``limit`` (``Limits.max_task_bytes``; 0: none said)."""
    if limit and size > limit:
        raise TaskTooLarge(
            f"the arguments of {what} are {_size(size)} serialized, over the broker's limit of "
            f"{_size(limit)} per task; pass less data (or have the task read it where it runs), "
            "or raise FARCALL_MAX_TASK_BYTES on the broker", size, limit)


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def _share_request(
    method: str, username: str | None, public: bool, *, allow_public: bool
) -> dict[str, Any]:
    """The ``ShareRequest`` body, checked here so a wrong argument fails before any request."""
    if username is not None and (
        not isinstance(username, str) or not re.fullmatch(USERNAME_PATTERN, username)
    ):
        raise ValueError(
            f"{method}: username must be a user's name on the broker (letters, digits and "
            f". _ @ + -, at most 64 characters), got {str(username)[:80]!r}"
        )
    if not isinstance(public, bool):
        raise ValueError(f"{method}: public must be True or False, got {public!r}")
    if username is None and not public:
        whom = "username='their name', or public=True for every user" if allow_public else (
            "username='their name'")
        raise ValueError(f"{method}: say whom with: {whom}")
    body = ShareRequest(username=username, public=public)
    return body.model_dump(exclude_defaults=True)


def split_batch(
    tasks: list[TaskSpec], max_tasks: int = MAX_BATCH_TASKS, max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[TaskSpec]]:
    """Consecutive chunks of at most ``max_tasks`` tasks and about ``max_bytes`` of payload."""
    chunk: list[TaskSpec] = []
    size = 0
    for spec in tasks:
        n = len(spec.args) + 200
        if chunk and (len(chunk) >= max_tasks or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += n
    if chunk:
        yield chunk


def _decode(answer: Response) -> Any:
    try:
        body = answer.json()
    except ValueError:
        body = None
    if answer.status < 400:
        if body is None:
            raise BrokerError(answer.status, f"the broker answered non-JSON: {answer.text[:200]}")
        return body
    error = body.get("error", "") if isinstance(body, dict) else ""
    message = body.get("message", "") if isinstance(body, dict) else ""
    raise broker_error(answer.status, message or answer.text[:500] or answer.reason, error, body)
