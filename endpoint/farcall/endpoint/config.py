"""Where an endpoint keeps its files, and its ``config.yaml``.

Layout under ``$FARCALL_HOME`` (default ``~/.farcall``)::

    config                     operator settings, TOML: broker_url, token
    endpoints/NAME/config.yaml this endpoint's configuration (``configure`` writes it)
    endpoints/NAME/endpoint.json  every registration: endpoint id, credential, broker URL and id
                                  (mode 0600; ``registration.py``)
    endpoints/NAME/endpoint.pid   pid of the running agent
    endpoints/NAME/endpoint.log   its log when started with --detach
    endpoints/NAME/status.json    connection and last heartbeat, written by the running agent
    endpoints/NAME/runinfo/       Parsl's run directories (ParslEngine, MPIEngine)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from farcall import config as sdk_config
from farcall.config import farcall_home
from farcall.endpoint import compat, problems
from farcall.endpoint.engines import ENGINES, engine_class, validate_engine
from farcall.endpoint.errors import EndpointConfigError, validation_problems
from farcall.errors import ConfigurationError
from farcall.protocol.channel import DATA_RETRY_SECONDS

__all__ = ["EndpointConfig", "configure", "endpoint_dir", "farcall_home", "load_config"]

CONFIG_FILE = "config.yaml"
IDENTITY_MAPPING = "identity_mapping.json"
USER_CONFIG_TEMPLATE = "user_config_template.yaml.j2"
USER_CONFIG_SCHEMA = "user_config_schema.json"
USER_ENVIRONMENT = "user_environment.yaml"
USER_ENDPOINTS_STATE = "user_endpoints.json"
"""A manager's running user endpoints (local user, config hash, state, idle time), for
``farcall-endpoint status`` and ``list``."""
RUNINFO_DIR = "runinfo"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class PamSettings(BaseModel):
    """Globus Compute's ``pam`` section of a manager: ``enable`` (true when the section is
    given) and ``service_name``. farcall opens no PAM session; it warns when enabled."""

    model_config = ConfigDict(extra="forbid")

    enable: bool = True
    service_name: str = Field(default="globus-compute-endpoint", min_length=1)


MANAGER_KEYS = ("identity_mapping_config_path", "audit_log_path", "user_endpoint_idle_seconds",
                "user_config_template_path", "user_config_schema_path", "public", "pam",
                "mu_child_ep_grace_period_s", "email", "force_mu_allow_same_user")
"""``config.yaml`` keys of a multi-user endpoint's manager only (an error beside an engine)."""


class EndpointConfig(BaseModel):
    """The contents of ``config.yaml``. Unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(default=None, min_length=1, max_length=200)
    broker_url: str | None = None
    heartbeat_period: float = Field(default=10.0, gt=0)
    stop_timeout: float = Field(
        default=10.0, ge=0, description="seconds a stop lets running tasks finish"
    )
    engine: dict[str, Any] = Field(
        default_factory=dict, description="what runs the tasks; without it, a manager")
    allowed_functions: list[str] | None = Field(
        default=None, description="function ids this endpoint runs; None = any of its owner's"
    )
    endpoint_setup: str | None = Field(default=None, description="shell commands run before start")
    endpoint_teardown: str | None = Field(default=None, description="shell commands run after stop")
    data_retry_seconds: float = Field(
        default=DATA_RETRY_SECONDS, ge=0, allow_inf_nan=False,
        description="seconds a worker keeps retrying a big argument's download or a big result's "
                    "upload after it first failed (the broker restarting), before the task fails")
    idle_shutdown_seconds: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="stop the agent after this many seconds with no task held or arriving "
                    "(a multi-user endpoint's manager sets it on every user endpoint; None: never)")
    # Globus Compute's keys with the same meaning there (compat.py has the table of every key).
    heartbeat_threshold: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="seconds without hearing from the broker before the connection is deemed "
                    "lost and the agent reconnects (None: WebSocket pings every 20 s, 20 s to "
                    "answer)")
    idle_heartbeats_soft: int = Field(
        default=0, ge=0,
        description="after at least one task, stop once this many heartbeat periods pass idle "
                    "with nothing outstanding; 0: never")
    idle_heartbeats_hard: int = Field(
        default=5760, ge=0,
        description="stop once this many heartbeat periods pass with no task or result moving, "
                    "even with some outstanding (only when idle_heartbeats_soft > 0)")
    debug: bool = Field(default=False, description="DEBUG logging, as farcall-endpoint -v")
    log_dir: str | None = Field(
        default=None, description="with start --detach: the log's directory (default: the "
                                  "endpoint's directory, which a relative path starts from)")
    stdout: str | None = Field(
        default=None, description="with start --detach: the daemon's output file, relative to "
                                  "log_dir (default: endpoint.log)")
    stderr: str | None = Field(
        default=None, description="with start --detach: the daemon's log file, relative to "
                                  "log_dir (default: the same file as stdout)")

    # A multi-user endpoint's manager (docs/multi-user.md): it runs no task itself; it starts a
    # user endpoint, as the submitter's own Unix account (as its own account when it does not run
    # as root), from the files beside config.yaml (USER_CONFIG_TEMPLATE, USER_CONFIG_SCHEMA,
    # USER_ENVIRONMENT) and its identity mapping. As in Globus Compute, a config.yaml without an
    # engine section is a manager's. The keys below apply to a manager only (MANAGER_KEYS).
    multi_user: bool = Field(
        default=False, description="run as a multi-user endpoint's manager (no engine of its own); "
                                   "true whenever config.yaml has no engine section")
    identity_mapping_config_path: str | None = Field(
        default=None, description="the identity mapping (JSON, Globus Compute's formats); "
                                  "default: identity_mapping.json beside config.yaml")
    audit_log_path: str | None = Field(
        default=None, description="a multi-user endpoint's audit log: one line per task state, "
                                  "with the local user and uid that ran it")
    user_endpoint_idle_seconds: float = Field(
        default=300.0, gt=0, allow_inf_nan=False,
        description="seconds a user endpoint with no work keeps running before it stops")
    user_config_template_path: str | None = Field(
        default=None, min_length=1, description=f"the user endpoint config template; default: "
                                                f"{USER_CONFIG_TEMPLATE} beside config.yaml")
    user_config_schema_path: str | None = Field(
        default=None, min_length=1, description=f"the JSON Schema of users' values; default: "
                                                f"{USER_CONFIG_SCHEMA} beside config.yaml")
    public: bool = Field(default=False, description="Globus Compute's listing to every user "
                                                    "(warned: farcall lists by sharing)")
    pam: PamSettings | None = Field(default=None, description="Globus Compute's PAM session "
                                                              "(warned: farcall opens none)")
    mu_child_ep_grace_period_s: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="Globus Compute's hold of a start request (warned: the broker asks again)")
    email: str | None = Field(default=None, description="Globus Compute's contact address "
                                                        "(warned: farcall publishes none)")
    force_mu_allow_same_user: bool = Field(
        default=False, description="Globus Compute's (deprecated) run-as-the-manager switch "
                                   "(warned: a root manager never does)")

    _warnings: list[problems.Problem] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[problems.Problem]:
        """Keys taken but not acted on as Globus Compute would, each with what farcall does
        instead; the endpoint logs each once, as a WARNING, when it starts."""
        return self._warnings

    @model_validator(mode="before")
    @classmethod
    def _globus_compute_keys(cls, data: Any) -> Any:
        """Globus Compute keys farcall takes without acting on them: a warning each, gone."""
        return compat.take_globus_keys(data) if isinstance(data, dict) else data

    @field_validator("heartbeat_threshold", "idle_heartbeats_soft", "idle_heartbeats_hard",
                     mode="before")
    @classmethod
    def _no_bool_counts(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML's yes/true would pass as 1
            raise ValueError("must be a number (of seconds for heartbeat_threshold, of heartbeat "
                             "periods for idle_heartbeats_*), not true or false")
        return value

    @field_validator("display_name", mode="before")
    @classmethod
    def _none_text_is_unset(cls, value: Any) -> Any:
        # Globus Compute wrote `display_name: None` into configs for a while; it means unset.
        return None if value == "None" else value

    @model_validator(mode="after")
    def _hard_needs_soft(self) -> EndpointConfig:
        if "idle_heartbeats_hard" in self.model_fields_set and not self.idle_heartbeats_soft:
            problems.warn("idle_heartbeats_hard", (
                "has no effect while idle_heartbeats_soft is 0 (as in Globus Compute): the endpoint "
                "never stops by itself; set idle_heartbeats_soft to a number of heartbeat periods "
                "to enable both"))
        return self

    @field_validator("data_retry_seconds", mode="before")
    @classmethod
    def _check_seconds(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number of seconds, 0 or more")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_engine_means_manager(cls, raw: Any) -> Any:
        """As in Globus Compute: no ``engine`` section, a manager (``multi_user`` true)."""
        if not isinstance(raw, dict) or "engine" in raw:
            return raw
        if raw.get("multi_user") is False:
            problems.error("engine", (
                "missing: a config.yaml without an engine section is a multi-user endpoint's "
                "manager (as in Globus Compute), and this one says multi_user: false. For an "
                "endpoint that runs tasks itself, add an engine section, for example "
                "`engine: {type: ProcessPoolEngine}` (worker processes on this host); for a "
                "manager, remove multi_user: false"))
            return raw
        return {**raw, "multi_user": True}

    @model_validator(mode="after")
    def _manager_has_no_engine(self) -> EndpointConfig:
        if self.multi_user and "engine" in self.model_fields_set:
            raise ValueError(
                "multi_user: true runs no tasks itself, so it takes no engine section: move it "
                f"into {USER_CONFIG_TEMPLATE}, which configures each user endpoint")
        if not self.multi_user:
            for key in MANAGER_KEYS:
                if key in self.model_fields_set:
                    problems.error(key, (
                        "applies only to a multi-user endpoint's manager (a config.yaml without "
                        "an engine section), and this endpoint has an engine section: remove "
                        f"{key}, or make this a manager by moving the engine section into "
                        f"{USER_CONFIG_TEMPLATE}"))
        else:
            self._warn_globus_manager_keys()
        return self

    def _warn_globus_manager_keys(self) -> None:
        """One warning for each Globus Compute manager key farcall takes but does not act on."""
        if self.public:
            problems.warn("public", (
                "farcall lists an endpoint only to its owner and the users it is shared with; "
                "the manager stays unlisted to others. Share it with each user who may use it "
                "(Client.share_endpoint(endpoint_id, username))"))
        if self.pam is not None and self.pam.enable:
            problems.warn("pam", (
                f"farcall opens no PAM session (service {self.pam.service_name!r}) for a user "
                "endpoint: the manager starts it with setresgid/initgroups/setresuid, a cleared "
                f"environment and {USER_ENVIRONMENT}'s variables, and PAM's account checks and "
                "limits are not applied; refuse an account in the identity mapping instead"))
        if self.mu_child_ep_grace_period_s is not None:
            problems.warn("mu_child_ep_grace_period_s", (
                "farcall keeps no start request: the broker asks the manager again while tasks "
                "wait for a user endpoint that is not connected (every "
                "FARCALL_USER_ENDPOINT_START_SECONDS), so a start that arrives as a user "
                "endpoint stops is repeated"))
        if self.email is not None:
            problems.warn("email", (
                "farcall publishes no contact address: users see the endpoint's display_name "
                "and its owner (shared_by in Client.get_endpoints()); name a contact in "
                "display_name if they need one"))
        if self.force_mu_allow_same_user:
            problems.warn("force_mu_allow_same_user", (
                "a manager running as root never starts a user endpoint as root or as its own "
                "account: a user mapped to either gets UserEndpointError. A manager run by an "
                "ordinary account starts its owner's user endpoints as that account without "
                "this key (docs/multi-user.md)"))

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            validate_engine(value)
        except EndpointConfigError as e:  # recorded, so the other keys are checked too
            for problem in getattr(e, "problems", None) or [problems.Problem("", str(e))]:
                problems.error(problem.key, problem.message)
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    def resolved_broker_url(self) -> str:
        """``broker_url`` from the file, else ``FARCALL_BROKER_URL``, else the operator config."""
        try:
            return sdk_config.broker_url(self.broker_url)
        except ConfigurationError as e:
            raise EndpointConfigError(f"{e} (or set broker_url in the endpoint's config.yaml)") from None

    def engine_spec(self, directory: Path) -> dict[str, Any]:
        """The ``engine`` section to build the engine from.

        Parsl's run directories go inside the endpoint's ``directory`` unless the file sets ``run_dir``.
        """
        spec = dict(self.engine)
        cls = engine_class(str(spec.get("type", "ProcessPoolEngine")))
        if "run_dir" in cls.Options.model_fields and not spec.get("run_dir"):
            spec["run_dir"] = str(directory / RUNINFO_DIR)
        return spec


def endpoint_dir(name: str) -> Path:
    """The endpoint's directory; the name must be a plain file name."""
    if not NAME_PATTERN.match(name):
        raise EndpointConfigError(
            f"invalid endpoint name {name!r}: use letters, digits, '_', '.' and '-' "
            "(starting with a letter or digit)"
        )
    return farcall_home() / "endpoints" / name


def operator_token() -> str:
    """The operator's user token: ``FARCALL_TOKEN``, else ``token`` in ``$FARCALL_HOME/config``."""
    try:
        return sdk_config.token()
    except ConfigurationError as e:
        raise EndpointConfigError(f"registering this endpoint needs your user token: {e}") from None


def load_config(name: str) -> EndpointConfig:
    """Read and validate ``endpoints/NAME/config.yaml``; errors name the file and the key."""
    path = endpoint_dir(name) / CONFIG_FILE
    if not path.is_file():
        raise EndpointConfigError(
            f"endpoint {name!r} is not configured ({path} does not exist); "
            f"run: farcall-endpoint configure {name}"
        )
    return parse_config(path.read_text(), str(path))


def parse_config(text: str, source: str = CONFIG_FILE) -> EndpointConfig:
    """Validate a ``config.yaml``'s text; :class:`~farcall.endpoint.problems.ConfigProblems`
    (an ``EndpointConfigError``) names every problem of the file at once, each with its
    dotted key. The config's ``warnings`` hold the keys taken but not acted on."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EndpointConfigError(f"{source}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise EndpointConfigError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    with problems.collecting(problems.Report()) as report:
        config = None
        try:
            config = EndpointConfig.model_validate(raw)
        except ValidationError as e:
            for problem in validation_problems(e, "", list(EndpointConfig.model_fields)):
                report.error(problem.key, problem.message)
        except EndpointConfigError as e:
            report.error("", str(e))
    report.errors.sort(key=lambda p: _file_position(p, raw))
    report.raise_if_errors(source)
    assert config is not None
    config._warnings = sorted(report.warnings, key=lambda p: _file_position(p, raw))
    return config


def _file_position(problem: problems.Problem, raw: dict[str, Any]) -> int:
    """Where the top-level key a problem is about sits in the file (its problems in that order;
    problems of the whole file last)."""
    key = problem.key or re.split(r"[.:\s]", problem.message, maxsplit=1)[0]
    order = list(raw)
    top = key.split(".", 1)[0]
    return order.index(top) if top in order else len(order)


PARSL_ENGINES = ("ParslEngine", "MPIEngine", "GlobusComputeEngine", "GlobusMPIEngine")
PROVIDER_TEMPLATES = {
    "LocalProvider": """\
  provider:
    # Blocks of workers on this machine.
    type: LocalProvider
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
""",
    "SlurmProvider": """\
  provider:
    type: SlurmProvider
    partition: debug
    # account: my-allocation
    # qos: normal
    nodes_per_block: 1
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
    walltime: "01:00:00"
    exclusive: false
    # Shell lines run in the job before the workers start (module loads, conda activate).
    # Default: put this endpoint's Python environment first on PATH.
    # worker_init: "module load python"
    # scheduler_options: "#SBATCH --constraint=cpu"
    launcher:
      type: SrunLauncher
""",
    "PBSProProvider": """\
  provider:
    type: PBSProProvider
    queue: workq
    # account: my-allocation
    cpus_per_node: 1
    nodes_per_block: 1
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
    walltime: "01:00:00"
    # select_options: "ngpus=1"
    # worker_init: "module load python"
    launcher:
      type: SingleNodeLauncher
""",
    "LSFProvider": """\
  provider:
    type: LSFProvider
    # queue: normal
    # project: my-allocation
    nodes_per_block: 1
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
    walltime: "01:00"
    # worker_init: "module load python"
    launcher:
      type: SingleNodeLauncher
""",
    "KubernetesProvider": """\
  provider:
    # One pod per block, in the cluster your kube config (or in-cluster config) points at.
    type: KubernetesProvider
    image: python:3.11
    namespace: default
    init_blocks: 0
    min_blocks: 0
    max_blocks: 2
    init_cpu: 1
    max_cpu: 2
    init_mem: 1Gi
    max_mem: 2Gi
    # The image must have farcall[endpoint] installed, or install it here:
    worker_init: "pip install 'farcall[endpoint]'"
""",
}


def configure(
    name: str,
    engine: str = "ProcessPoolEngine",
    broker_url: str | None = None,
    max_workers: int | None = None,
    force: bool = False,
    provider: str | None = None,
    multi_user: bool = False,
    display_name: str | None = None,
) -> Path:
    """Write a commented ``config.yaml`` for a new endpoint and return its path.

    ``multi_user``: a multi-user endpoint's manager (no engine), with the files beside it that
    configure its user endpoints (``multiuser/defaults.py``).
    """
    if multi_user:
        if engine != "ProcessPoolEngine" or provider is not None or max_workers is not None:
            raise EndpointConfigError(
                "a multi-user endpoint runs no tasks itself, so --engine, --provider and "
                f"--max-workers do not apply: its user endpoints' engine is in {USER_CONFIG_TEMPLATE}, "
                "which configure writes with a commented example")
        from farcall.endpoint.migrate import set_top_level
        from farcall.endpoint.multiuser.defaults import write_multi_user_files

        path = write_multi_user_files(endpoint_dir(name), name, broker_url, force)
        if display_name is not None:
            path.write_text(set_top_level(path.read_text(), "display_name", display_name))
        return path
    if engine not in ENGINES:
        raise EndpointConfigError(
            f"unknown engine {engine!r}; valid choices: {', '.join(ENGINES)}"
        )
    if provider is not None and (engine not in PARSL_ENGINES or provider not in PROVIDER_TEMPLATES):
        raise EndpointConfigError(
            f"--provider {provider} needs --engine ParslEngine (or MPIEngine) and one of: "
            + ", ".join(PROVIDER_TEMPLATES)
        )
    directory = endpoint_dir(name)
    path = directory / CONFIG_FILE
    if path.exists() and not force:
        raise EndpointConfigError(
            f"endpoint {name!r} is already configured ({path}); edit that file, "
            "or pass --force to overwrite it"
        )
    text = config_template(name, engine, broker_url, max_workers, provider, display_name)
    parse_config(text, str(path))  # never write a file that `start` would refuse
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(text)
    return path


def config_template(
    name: str,
    engine: str,
    broker_url: str | None,
    max_workers: int | None,
    provider: str | None = None,
    display_name: str | None = None,
) -> str:
    shown = json.dumps(display_name) if display_name is not None else name
    url_line = f"broker_url: {broker_url}" if broker_url else "# broker_url: https://broker.example.org"
    return f"""\
# farcall endpoint "{name}"
# Written by `farcall-endpoint configure {name}`. Edit it, then run
# `farcall-endpoint start {name}`. Unknown keys are errors.

# Name shown to users in Client.get_endpoints().
display_name: {shown}

# The broker to connect to. When absent: $FARCALL_BROKER_URL, then broker_url
# in $FARCALL_HOME/config.
{url_line}

# Seconds between heartbeats; the broker marks the endpoint offline after
# three missed ones.
heartbeat_period: 10

# On stop (SIGTERM, Ctrl-C, `farcall-endpoint stop`): seconds to let running
# tasks finish before they are abandoned (the broker hands them out again).
stop_timeout: 10

# Stop by itself once idle, counted in heartbeat periods as Globus Compute does:
# after at least one task, this many periods with nothing running or unsent
# (0: never); idle_heartbeats_hard: this many with nothing moving at all.
# idle_heartbeats_soft: 0
# idle_heartbeats_hard: 5760

# Only these registered functions may run here (ids from Client.register_function);
# a task for any other function fails with FunctionNotAllowed and never runs.
# allowed_functions:
#   - 00000000-0000-0000-0000-000000000000

# Seconds a worker keeps retrying a big argument's download or a big result's
# upload (the data plane) while the broker is unreachable or busy, such as during
# a restart, before the task fails. Raise it to ride out longer broker outages.
data_retry_seconds: {DATA_RETRY_SECONDS:g}

# Shell commands run before the endpoint starts (a failure stops the start) and
# after it stops.
# endpoint_setup: "module load python"
# endpoint_teardown: "rm -rf /tmp/my-scratch"

engine:
{_engine_template(engine, max_workers, provider)}"""


def _engine_template(engine: str, max_workers: int | None, provider: str | None) -> str:
    if engine in PARSL_ENGINES:
        return _parsl_template(engine, max_workers, provider or "LocalProvider")
    workers = max_workers or os.cpu_count() or 1
    chunk = ""
    if engine == "ProcessPoolEngine":
        chunk = (
            "  # Most tasks sent to one worker process in one message (short tasks are\n"
            "  # batched to cut overhead; long tasks always go one at a time).\n"
            "  max_chunk: 64\n"
        )
    return f"""\
  # ThreadPoolEngine: threads inside the agent (I/O-bound functions).
  # ProcessPoolEngine: worker processes on this machine.
  # ParslEngine: workers in blocks from a scheduler (Slurm, PBS Pro, LSF, Kubernetes);
  #   run `farcall-endpoint configure NAME --engine ParslEngine --provider SlurmProvider`
  #   for a commented example.
  type: {engine}
  # Number of workers (default: the number of CPUs).
  max_workers: {workers}
  # Tasks fetched ahead per worker, so workers never wait on the network.
  prefetch: 128
{chunk}"""


def _parsl_template(engine: str, max_workers: int | None, provider: str) -> str:
    mpi = engine in ("MPIEngine", "GlobusMPIEngine")
    if mpi:
        workers = f"""\
  # MPI tasks run at once per block (each spans num_nodes nodes of the block).
  max_workers_per_block: {max_workers or 1}
  # How a task launches its ranks: mpiexec, srun or aprun (the task reads the
  # ready-made prefix from $PARSL_MPI_PREFIX).
  mpi_launcher: mpiexec
"""
    else:
        per_node = f"max_workers_per_node: {max_workers}" if max_workers else "# max_workers_per_node: 4"
        workers = f"""\
  # Worker processes per node (default: one per core, see cores_per_worker).
  {per_node}
  # cores_per_worker: 1
"""
    provider_text = PROVIDER_TEMPLATES[provider]
    if mpi:
        provider_text = provider_text.replace(
            "    launcher:\n      type: SrunLauncher\n", "").replace(
            "    launcher:\n      type: SingleNodeLauncher\n", "")
        provider_text += "    # MPI mode places one worker pool per block: keep SimpleLauncher.\n"
        provider_text += "    launcher:\n      type: SimpleLauncher\n"
    return f"""\
  # {engine}: Parsl's {"MPIExecutor" if mpi else "HighThroughputExecutor"}. Workers come in
  # blocks the provider gets from the scheduler: added while tasks wait, released
  # after max_idletime seconds idle (down to min_blocks). Any other key here is
  # passed to the executor.
  type: {engine}
{workers}\
  # Where workers connect back to this host. 127.0.0.1 only works for workers on
  # this machine; on a cluster, give this host's address on the compute network.
  address: 127.0.0.1
  # Seconds a block may sit idle before it is released.
  max_idletime: 120
  # Seconds between Parsl's scaling decisions.
  strategy_period: 1
  # Tasks the endpoint holds per worker it could start.
  prefetch: 128
  # Short tasks (well under 5 ms) run up to this many to a Parsl task.
  max_chunk: 64
{provider_text}"""
