"""A multi-user endpoint's manager: ``farcall-endpoint start NAME`` with ``multi_user: true``.

The manager is an agent that runs no task (``ManagerEngine``) and says in its
``Hello`` that it is a manager, with its ``user_config_schema.json``. For every
``StartUserEndpoint`` the broker sends it (tasks wait in that user endpoint's own queue):

- a user endpoint of that id already running: nothing to do;
- otherwise, run as root (``privileges.py``), it maps the user's identities
  (``identity_mapping.json``, re-read when it changes), looks the account up, refuses uid 0 and
  its own uid; run by an ordinary account, it takes only its owner (``owner.py``) and runs them
  as its own account, with no identity mapping, as Globus Compute does. Then it checks the
  values against the schema, renders ``user_config_template.yaml.j2`` and starts the user
  endpoint as that account (``launch.py``: privileges dropped when it has them, credential on a
  pipe, an ordinary agent that stops after ``user_endpoint_idle_seconds`` idle);
- if any of that fails, it connects as that user endpoint itself (it has the credential) with a
  ``RefusingEngine``, which fails each of its tasks at once with ``IdentityMappingError`` or
  ``UserEndpointError`` saying what the administrator must fix, and stops when idle. The next
  start checks again, so a fixed mapping file takes effect without a restart.

A user endpoint that exits is forgotten: the broker asks again when work waits for it. Stopping
the manager stops every user endpoint (SIGTERM, SIGKILL after ``stop_timeout``). The manager keeps
``user_endpoints.json`` (``USER_ENDPOINTS_STATE``) beside its config for ``status`` and ``list``,
and, with ``audit_log_path`` set, appends every task state its user endpoints report to it.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from farcall.endpoint import daemon, lockdown, problems
from farcall.endpoint.agent import Agent
from farcall.endpoint.config import (
    IDENTITY_MAPPING,
    USER_ENVIRONMENT,
    EndpointConfig,
    parse_config,
)
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.engines import build_engine, engine_class
from farcall.endpoint.engines.base import Engine, EngineStatus, OnDone, OnStart
from farcall.endpoint.errors import EndpointConfigError, EndpointError, EndpointRejected
from farcall.endpoint.multiuser.environment import load_user_environment
from farcall.endpoint.multiuser.errors import UserConfigError
from farcall.endpoint.multiuser.events import AuditLog, parse_events
from farcall.endpoint.multiuser.identity import IdentityMapper, LocalUser, local_user
from farcall.endpoint.multiuser.launch import LaunchSpec, LaunchUser
from farcall.endpoint.multiuser.owner import Owner, load_owner, resolve_owner
from farcall.endpoint.multiuser.privileges import check_privileges
from farcall.endpoint.multiuser.state import write_user_endpoints
from farcall.endpoint.multiuser.templates import (
    check_user_config,
    load_user_config_schema,
    manager_file,
    render_user_config,
    template_path,
)
from farcall.endpoint.outcomes import failed_result
from farcall.endpoint.registration import (
    confirm,
    ensure_registered,
    load_registration,
    refused,
    stored_credential,
)
from farcall.errors import IdentityMappingError, UserEndpointError
from farcall.protocol.channel import StartUserEndpoint, TaskMessage, Welcome

log = logging.getLogger(__name__)

__all__ = ["ManagerEngine", "RefusingEngine", "UserEndpointManager", "check_manager",
           "check_privileges", "start"]

REFUSAL_IDLE_SECONDS = 5.0
"""A user endpoint answered by the manager (its user could not be mapped) disconnects after this
long without tasks, so that the next start, with a mapping fixed meanwhile, checks again."""
WATCH_PERIOD = 0.5
"""Seconds between the watcher's checks for exited user endpoints."""
STATE_WRITE_PERIOD = 1.0
"""``user_endpoints.json`` is rewritten at most this often for activity alone."""
LAUNCH_LOGS = "user_endpoints"
"""The manager's directory for the launch's own messages (errors before the user's log exists)."""
CHILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


# ------------------------------------------------------------------ engines


class ManagerEngine(Engine):
    """The manager's engine: it runs no task. The broker routes every task for a manager to one
    of its user endpoints once it knows the endpoint is one (its first hello); a task submitted
    before that waits in the manager's own queue, and is failed here at once, saying to submit
    it again (a small capacity, so such tasks come and nothing waits for ever)."""

    CAPACITY = 16

    @property
    def name(self) -> str:
        return "MultiUserManager"

    def start(self) -> None:
        pass

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        on_done(failed_result(task.task_id, UserEndpointError(
            "this task was submitted to a multi-user endpoint before it first connected, when "
            "the broker did not know it runs tasks only in user endpoints; submit it again "
            "(with user_endpoint_config={...} if the endpoint's administrator asks for values)")))

    def status(self) -> EngineStatus:
        return EngineStatus(details={"multi_user": True})

    @property
    def capacity(self) -> int:
        return self.CAPACITY

    def cancel(self, task_ids: Collection[str], reason: BaseException) -> None:
        pass

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        pass


class RefusingEngine(ManagerEngine):
    """Fails every task at once with ``error``: the manager answering for a user endpoint it
    cannot start (no mapping, no account, a refused uid, a bad configuration)."""

    CAPACITY = 100

    def __init__(self, error: IdentityMappingError | UserEndpointError) -> None:
        self.error = error

    @property
    def name(self) -> str:
        return "RefusingEngine"

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        on_done(failed_result(task.task_id, self.error))

    def status(self) -> EngineStatus:
        return EngineStatus(details={"refusing": str(self.error)})

    @property
    def capacity(self) -> int:
        return self.CAPACITY


# ------------------------------------------------------------------ user endpoints


@dataclass
class UserEndpoint:
    """One user endpoint the manager started (a process) or answers for (``refusal``)."""

    endpoint_id: str
    username: str
    """The farcall user it serves."""
    local_user: str
    uid: int | None
    config_hash: str
    state: str
    """``starting`` (launched, not connected yet), ``running``, ``stopping``, or ``failed``
    (the manager answers its tasks with the error in ``reason``)."""
    started_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.time)
    pid: int | None = None
    reason: str = ""
    process: subprocess.Popen[bytes] | None = None
    refusal: BackgroundAgent | None = None
    events_fd: int | None = None
    events: bytearray = field(default_factory=bytearray)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.refusal is not None and self.refusal.alive

    def row(self) -> dict[str, Any]:
        return {"endpoint_id": self.endpoint_id, "username": self.username,
                "local_user": self.local_user, "uid": self.uid, "config_hash": self.config_hash,
                "state": self.state, "pid": self.pid, "started_at": self.started_at,
                "last_activity": self.last_activity, "reason": self.reason}


@dataclass(frozen=True)
class Prepared:
    """What a user endpoint needs to start: its account, its config.yaml, its environment."""

    user: LocalUser
    config: str
    environment: dict[str, str]


class UserEndpointManager:
    """Starts, watches and stops the user endpoints of the manager ``name`` (this module's
    docstring). ``request_start`` is the agent's ``on_start_user_endpoint``."""

    def __init__(self, name: str, directory: Path, config: EndpointConfig, broker_url: str,
                 *, endpoint_id: str = "", python: str = sys.executable,
                 privileged: bool | None = None, owner: Owner | None = None) -> None:
        self.name = name
        self.endpoint_id = endpoint_id
        """The manager's own id (what an external identity mapping program gets after ``-s``)."""
        self.directory = directory
        self.config = config
        self.broker_url = broker_url
        self.python = python
        self.privileged = check_privileges() if privileged is None else privileged
        """Root (or the capabilities): users run as the accounts the identity mapping names.
        Otherwise only ``owner`` is served, as this process's own account."""
        self.owner = owner
        self.mapping_path = manager_file(directory, config.identity_mapping_config_path,
                                         IDENTITY_MAPPING)
        self.schema = load_user_config_schema(directory, config)
        self._mapper: IdentityMapper | None = None
        self.audit = AuditLog(Path(config.audit_log_path)) if config.audit_log_path else None
        self._endpoints: dict[str, UserEndpoint] = {}
        self._failed_starts: dict[str, str] = {}
        """User endpoints that exited before they ever connected, and why: their next start
        answers their tasks with that instead of failing again unseen."""
        self._lock = threading.Lock()
        self._starts: queue.Queue[StartUserEndpoint | None] = queue.Queue()
        self._watched: queue.Queue[UserEndpoint] = queue.Queue()
        self._stopping = threading.Event()
        self._watching = threading.Event()
        self._state_written = 0.0
        self._dirty = True
        self._threads: list[threading.Thread] = []

    # -------------------------------------------------------------- lifecycle

    def begin(self) -> None:
        """Start the threads that launch and watch user endpoints."""
        (self.directory / LAUNCH_LOGS).mkdir(mode=0o700, exist_ok=True)
        if self.privileged:
            self.mapper()  # an invalid mapping file stops the start here, saying why
        else:
            me = own_account()
            owner = self.owner.username if self.owner else "(unknown: it serves no one)"
            log.info("multi-user endpoint %s runs as %s (uid %d), which cannot change user: it "
                     "starts user endpoints as %s for its owner %s only, with no identity "
                     "mapping (as Globus Compute does); run it as root to serve every user as "
                     "their own account", self.name, me.name, me.uid, me.name, owner)
        self._watching.set()
        for target, name in ((self._start_loop, "farcall-starts"),
                             (self._watch_loop, "farcall-user-endpoints")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._write_state()

    def request_start(self, frame: StartUserEndpoint) -> None:
        """A ``StartUserEndpoint`` from the broker, handled on the starts thread (returns at once)."""
        if not self._stopping.is_set():
            self._starts.put(frame)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop every user endpoint (SIGTERM, SIGKILL after ``timeout``, default the config's
        ``stop_timeout``), then the manager's threads; what they report meanwhile is audited."""
        timeout = self.config.stop_timeout if timeout is None else timeout
        self._stopping.set()
        self._starts.put(None)
        starts, watchers = self._threads[:1], self._threads[1:]
        for thread in starts:
            thread.join(30)
        with self._lock:
            endpoints = list(self._endpoints.values())
            for ep in endpoints:
                ep.state = "stopping"
            self._dirty = True
        for ep in endpoints:
            if ep.process is not None and ep.alive():
                _signal(ep.process.pid, signal.SIGTERM)
            elif ep.refusal is not None:
                ep.refusal.agent.request_stop()
        deadline = time.monotonic() + timeout
        for ep in endpoints:
            if ep.process is not None:
                try:
                    ep.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("user endpoint %s (pid %d, %s) did not stop within %.0f s: "
                                "killing it", ep.endpoint_id, ep.process.pid, ep.local_user,
                                timeout)
                _kill_group(ep.process.pid)
                ep.process.wait()
            elif ep.refusal is not None:
                ep.refusal.stop(max(1.0, deadline - time.monotonic()))
        self._watching.clear()
        for thread in watchers:
            thread.join(10)
        for ep in endpoints:
            self._drain_events(ep)
        with self._lock:
            self._endpoints.clear()
        self._write_state()
        if self.audit is not None:
            self.audit.close()
        log.info("stopped %d user endpoint(s)", len(endpoints))

    def user_endpoints(self) -> list[UserEndpoint]:
        with self._lock:
            return list(self._endpoints.values())

    # -------------------------------------------------------------- starting

    def directory_name(self, endpoint_id: str) -> str:
        """A user endpoint's directory under the user's ``~/.farcall/endpoints`` (and the name of
        its launch's log in the manager's ``LAUNCH_LOGS``): ``<manager>.<first 8 of its id>``."""
        return f"{self.name}.{endpoint_id[:8]}"

    def mapper(self) -> IdentityMapper:
        if self._mapper is None:
            self._mapper = IdentityMapper(self.mapping_path, self.endpoint_id)
        return self._mapper

    def _start_loop(self) -> None:
        while (frame := self._starts.get()) is not None:
            try:
                self.handle_start(frame)
            except Exception:
                log.exception("starting user endpoint %s failed", frame.endpoint_id)

    def handle_start(self, frame: StartUserEndpoint) -> None:
        """Start the user endpoint ``frame`` asks for, unless it runs; answer its tasks with the
        reason when it cannot start."""
        with self._lock:
            current = self._endpoints.get(frame.endpoint_id)
        if current is not None and current.alive() and current.process is not None:
            log.debug("user endpoint %s is already running (pid %s)", frame.endpoint_id, current.pid)
            return
        try:
            prepared = self.prepare(frame)
            failed = self._failed_starts.pop(frame.endpoint_id, None)
            if failed is not None:
                raise UserEndpointError(failed)
        except (IdentityMappingError, UserEndpointError) as e:
            if current is not None and current.alive():
                return  # already answering its tasks with the reason
            log.warning("cannot start user endpoint %s for %s: %s", frame.endpoint_id,
                        frame.username, e)
            self._refuse(frame, e)
            return
        if current is not None and current.refusal is not None and current.alive():
            log.info("user endpoint %s for %s can start now: no longer answering for it",
                     frame.endpoint_id, frame.username)
            current.refusal.stop(5.0)
        self._launch(frame, prepared)

    def prepare(self, frame: StartUserEndpoint) -> Prepared:
        """Map the user (or, run by an ordinary account, check it is the owner), look up the
        account and render the configuration, or say why not (``IdentityMappingError``,
        ``UserEndpointError``)."""
        who = f"{frame.username} ({frame.user_id})" if frame.username else frame.user_id
        user = self._map(frame, who) if self.privileged else self._owner_account(frame, who)
        values = frame.user_endpoint_config
        try:
            text, _ = render_user_config(self.directory, values, user, self.config,
                                         identity=frame.user_id)
            environment = load_user_environment(self.directory)
            config = self.child_config(text, environment)
        except EndpointConfigError as e:
            raise UserEndpointError(
                f"multi-user endpoint {self.name} cannot start a user endpoint for {who} with "
                f"user_endpoint_config {json.dumps(values)}: {e}") from None
        return Prepared(user, config, environment)

    def _owner_account(self, frame: StartUserEndpoint, who: str) -> LocalUser:
        """This process's account, for the manager's owner alone (the manager cannot change
        user, so anyone else would run as it)."""
        me = own_account()
        if self.owner is None or frame.user_id != self.owner.user_id:
            owner = f"its owner {self.owner.username}" if self.owner else "its owner"
            raise UserEndpointError(
                f"multi-user endpoint {self.name} runs as the ordinary account {me.name}, not as "
                f"root, so it runs tasks only for {owner}, as {me.name} (as Globus Compute "
                f"does); user {who} cannot use it. Use an endpoint of your own, or ask its "
                "administrator to run it as root with an identity mapping, which runs each user "
                "as their own account (docs/multi-user.md)")
        return me

    def _map(self, frame: StartUserEndpoint, who: str) -> LocalUser:
        """The account the identity mapping gives the user, never root or the manager's own."""
        try:
            name = self.mapper().map_identity(frame.identities)
        except Exception as e:  # noqa: BLE001 - an external program may fail in any way
            raise IdentityMappingError(
                f"multi-user endpoint {self.name} could not map user {who} to a local account: "
                f"{e}. The endpoint's administrator must fix the identity mapping "
                f"({self.mapping_path})") from None
        if not name:
            raise IdentityMappingError(
                f"user {who} has no local account on multi-user endpoint {self.name}: no rule of "
                f"its identity mapping matched them. The endpoint's administrator must add a rule "
                f"for this user to {self.mapping_path}")
        try:
            user = local_user(name)
        except LookupError as e:
            raise IdentityMappingError(
                f"user {who} cannot run on multi-user endpoint {self.name}: {e} "
                f"({self.mapping_path})") from None
        if user.uid == 0 or user.uid == os.getuid():
            raise UserEndpointError(
                f"multi-user endpoint {self.name} maps user {who} to {user.name} (uid {user.uid}),"
                " and it never runs a user endpoint as root or as its own account. The endpoint's "
                f"administrator must map this user to their own account in {self.mapping_path}")
        return user

    def child_config(self, rendered: str, environment: dict[str, str] | None = None) -> str:
        """The user endpoint's ``config.yaml``: the rendered template with what the manager
        fixes (its broker, the idle stop), and the names of ``user_environment.yaml`` passed
        through to its workers (they serve that one user); ``EndpointConfigError`` if it is not
        a valid single-user configuration."""
        try:
            values = yaml.safe_load(rendered) or {}
        except yaml.YAMLError as e:
            raise EndpointConfigError(f"the rendered template is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise EndpointConfigError("the rendered template is not a mapping of keys")
        values.update(broker_url=self.broker_url,
                      idle_shutdown_seconds=self.config.user_endpoint_idle_seconds)
        engine = values.get("engine") if environment else None
        if environment and isinstance(engine, dict):
            options = engine_class(str(engine.get("type", "ProcessPoolEngine"))).Options
            if "worker_env_passthrough" in options.model_fields:
                listed = list(engine.get("worker_env_passthrough") or [])
                engine["worker_env_passthrough"] = listed + [
                    name for name in environment if name not in listed]
        text = yaml.safe_dump(values, sort_keys=False)
        parse_config(text, "the user endpoint's config.yaml")
        return text

    def _refuse(self, frame: StartUserEndpoint,
                error: IdentityMappingError | UserEndpointError) -> None:
        agent = Agent(self.broker_url, frame.endpoint_id, frame.credential, RefusingEngine(error),
                      heartbeat_period=self.config.heartbeat_period, stop_timeout=1.0,
                      display_name=f"{self.name} (refusing {frame.username or frame.user_id})",
                      idle_shutdown_seconds=min(REFUSAL_IDLE_SECONDS,
                                                self.config.user_endpoint_idle_seconds))
        runner = BackgroundAgent(agent)
        ep = UserEndpoint(frame.endpoint_id, frame.username, "", None, frame.config_hash,
                          "failed", reason=str(error), refusal=runner)
        with self._lock:
            self._endpoints[frame.endpoint_id] = ep
            self._dirty = True
        runner.start()

    def _launch(self, frame: StartUserEndpoint, prepared: Prepared) -> None:
        user = prepared.user
        directory_name = self.directory_name(frame.endpoint_id)
        events_r, events_w = os.pipe()
        spec_r, spec_w = os.pipe()
        spec = LaunchSpec(
            user=LaunchUser(name=user.name, uid=user.uid, gid=user.gid, home=user.home,
                            shell=user.shell),
            directory_name=directory_name, endpoint_id=frame.endpoint_id,
            credential=frame.credential, broker_url=self.broker_url, config=prepared.config,
            environment=prepared.environment, events_fd=events_w, manager_pid=os.getpid())
        launch_log = self.directory / LAUNCH_LOGS / f"{directory_name}.log"
        try:
            with open(launch_log, "wb") as out:
                # From this thread, which lives as long as the manager runs: the launch asks
                # for SIGTERM when its parent thread ends (PR_SET_PDEATHSIG).
                process = subprocess.Popen(
                    [self.python, "-m", "farcall.endpoint.multiuser.launch",
                     "--spec-fd", str(spec_r)],
                    pass_fds=(spec_r, events_w), close_fds=True, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
                    env={"PATH": CHILD_PATH, "LANG": "C.UTF-8"})
        except OSError as e:
            os.close(spec_w)
            os.close(events_r)
            log.error("cannot start the launch of user endpoint %s: %s", frame.endpoint_id, e)
            self._refuse(frame, UserEndpointError(
                f"multi-user endpoint {self.name} could not start a user endpoint for "
                f"{frame.username or frame.user_id}: {e}. The endpoint's administrator must fix "
                "its installation (see its log)"))
            return
        finally:
            os.close(spec_r)
            os.close(events_w)
        try:
            _write_all(spec_w, spec.model_dump_json().encode())
        except BrokenPipeError:
            pass  # the launch died first; its exit is seen by the watcher
        finally:
            os.close(spec_w)
        os.set_blocking(events_r, False)
        ep = UserEndpoint(frame.endpoint_id, frame.username, user.name, user.uid,
                          frame.config_hash, "starting", pid=process.pid, process=process,
                          events_fd=events_r)
        with self._lock:
            self._endpoints[frame.endpoint_id] = ep
            self._dirty = True
        self._watched.put(ep)
        log.info("started user endpoint %s for %s as %s (uid %d, pid %d, config %s)",
                 frame.endpoint_id, frame.username or frame.user_id, user.name, user.uid,
                 process.pid, frame.config_hash[:12])

    # -------------------------------------------------------------- watching

    def _watch_loop(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            while self._watching.is_set():
                while not self._watched.empty():
                    ep = self._watched.get()
                    if ep.events_fd is not None:
                        selector.register(ep.events_fd, selectors.EVENT_READ, ep)
                for key, _ in selector.select(WATCH_PERIOD):
                    ep = key.data
                    if not self._read_events(ep):
                        selector.unregister(key.fd)
                        self._close_events(ep)
                self._reap(selector)
                self._maybe_write_state()
        finally:
            selector.close()

    def _read_events(self, ep: UserEndpoint) -> bool:
        """Take what ``ep`` reported; False once its pipe is closed."""
        assert ep.events_fd is not None
        try:
            data = os.read(ep.events_fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        ep.events += data
        events = parse_events(ep.events)
        if not events:
            return True
        ep.last_activity = time.time()
        if ep.state == "starting" and any(state == "connected" for state, _ in events):
            ep.state = "running"
            self._dirty = True
        if self.audit is not None and ep.uid is not None:
            self.audit.write(ep.endpoint_id, ep.local_user, ep.uid, events)
        return True

    def _reap(self, selector: selectors.BaseSelector) -> None:
        with self._lock:
            gone = [ep for ep in self._endpoints.values() if not ep.alive()]
            for ep in gone:
                del self._endpoints[ep.endpoint_id]
            if gone:
                self._dirty = True
        for ep in gone:
            if ep.events_fd is not None:
                try:
                    selector.unregister(ep.events_fd)
                except (KeyError, ValueError):
                    pass
                self._drain_events(ep)
            if ep.process is not None and ep.state == "starting" and ep.process.returncode:
                self._failed_starts[ep.endpoint_id] = self._start_failure(ep)
            if ep.process is not None:
                code = ep.process.returncode
                how = ("stopped" if code == 0 else f"exited with code {code}" if code > 0
                       else f"was killed by signal {-code}")
                level = logging.INFO if code == 0 else logging.WARNING
                log.log(level, "user endpoint %s (%s, pid %d) %s%s", ep.endpoint_id, ep.local_user,
                        ep.process.pid, how, "" if code == 0 else
                        f"; see {self.directory / LAUNCH_LOGS} and the user's ~/.farcall/endpoints/"
                        f"{self.directory_name(ep.endpoint_id)}/endpoint.log")
            else:
                log.info("no longer answering for user endpoint %s", ep.endpoint_id)

    def _start_failure(self, ep: UserEndpoint) -> str:
        """Why ``ep`` never connected, for its user: the launch's last words, where to look."""
        directory_name = self.directory_name(ep.endpoint_id)
        try:
            said = (self.directory / LAUNCH_LOGS / f"{directory_name}.log").read_text(
                errors="replace").strip().splitlines()[-1:]
        except OSError:
            said = []
        return (f"the user endpoint of multi-user endpoint {self.name} for {ep.username} "
                f"(local account {ep.local_user}) exited before it connected (exit code "
                f"{ep.process.returncode if ep.process else '?'})"
                + (f": {said[0][:500]}" if said else "")
                + f". The endpoint's administrator can read why in {self.directory / LAUNCH_LOGS}"
                f" and in ~{ep.local_user}/.farcall/endpoints/{directory_name}/endpoint.log; "
                "submit again once it is fixed")

    def _drain_events(self, ep: UserEndpoint) -> None:
        """Take what an ended user endpoint wrote last, then close its pipe."""
        while ep.events_fd is not None and _readable(ep.events_fd) and self._read_events(ep):
            pass
        self._close_events(ep)

    def _close_events(self, ep: UserEndpoint) -> None:
        fd, ep.events_fd = ep.events_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # -------------------------------------------------------------- state file

    def _maybe_write_state(self) -> None:
        now = time.monotonic()
        if self._dirty or now - self._state_written >= STATE_WRITE_PERIOD * 5:
            self._write_state()

    def _write_state(self) -> None:
        self._dirty = False
        self._state_written = time.monotonic()
        write_user_endpoints(self.directory, [ep.row() for ep in self.user_endpoints()])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _readable(fd: int) -> bool:
    with selectors.DefaultSelector() as found:
        found.register(fd, selectors.EVENT_READ)
        return bool(found.select(0))


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_group(pid: int) -> None:
    """SIGKILL what is left of a user endpoint: its process group (it leads its own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ farcall-endpoint start


def own_account() -> LocalUser:
    """The account this process runs as (a uid without a password entry, as in some containers:
    named by its number, at home in ``$HOME``)."""
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return LocalUser(str(os.getuid()), os.getuid(), os.getgid(),
                         os.environ.get("HOME") or "/", "/bin/sh")
    return LocalUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)


def check_manager(name: str, directory: Path, config: EndpointConfig) -> dict[str, str]:
    """``farcall-endpoint check`` for a manager: what ``start`` would load, starting nothing.

    Run as root: the identity mapping. Always: the schema, ``user_environment.yaml``, and the
    template rendered for this account with the schema's defaults (no values without a schema),
    the result checked as a user endpoint's ``config.yaml`` and its engine built with
    ``prepare()``. Each problem is recorded (``problems.error``), so all are reported together;
    what was found is returned.
    """
    built = {"engine": ManagerEngine().name}
    try:
        privileged = check_privileges()
    except EndpointError as e:
        problems.error("", str(e))
        privileged = True
    me = own_account()
    mapping = manager_file(directory, config.identity_mapping_config_path, IDENTITY_MAPPING)
    if privileged:
        built["runs user endpoints as"] = "the accounts the identity mapping gives"
        try:
            IdentityMapper(mapping)
            built["identity mapping"] = str(mapping)
        except EndpointConfigError as e:
            problems.error("identity_mapping_config_path", str(e))
    else:
        built["runs user endpoints as"] = f"{me.name} (uid {me.uid}), for its owner only"
        if config.identity_mapping_config_path:
            problems.warn("identity_mapping_config_path", (
                f"this manager runs as the ordinary account {me.name}, not as root, so it maps "
                f"no identity and {mapping} is not read: it runs its owner's tasks only, as "
                f"{me.name}. Run it as root for the identity mapping to apply"))
    schema: dict[str, Any] | None = None
    try:
        schema = load_user_config_schema(directory, config)
        built["schema"] = "none" if schema is None else "yes"
        usable = True
    except EndpointConfigError as e:
        problems.error("user_config_schema_path", str(e))
        usable = False
    try:
        load_user_environment(directory)
    except EndpointConfigError as e:
        problems.error(USER_ENVIRONMENT, str(e))
    _check_template(directory, config, schema if usable else None, me, built)
    return built


def _check_template(directory: Path, config: EndpointConfig, schema: dict[str, Any] | None,
                    user: LocalUser, built: dict[str, str]) -> None:
    """Render the template for ``user`` with the schema's defaults (none without a usable
    schema) and build its engine."""
    path = template_path(directory, config)
    built["user endpoints"] = f"rendered from {path}"
    properties = (schema or {}).get("properties")
    values = {key: spec["default"] for key, spec in (properties or {}).items()
              if isinstance(spec, dict) and "default" in spec}
    try:
        check_user_config(schema, values)
    except UserConfigError as e:
        built["user endpoints"] += (f"; not rendered here: with no values sent, {e}. Try it with "
                                    "values: farcall-endpoint render-user-config")
        return
    try:
        _, rendered = render_user_config(directory, values, user, config, values_checked=True)
        spec = rendered.engine_spec(directory)
        made = build_engine(spec).prepare()
    except EndpointConfigError as e:
        problems.error("user_config_template_path", str(e))
        return
    for warning in rendered.warnings:
        problems.warn(f"{path.name}: {warning.key}", warning.message)
    shown = ", ".join(f"{k} {v}" for k, v in made.items())
    built["user endpoints"] += f" ({shown}, for {user.name} with "
    built["user endpoints"] += (f"{json.dumps(values)})" if values else "no values)")


def start(name: str, directory: Path, config: EndpointConfig, broker_url: str, *,
          detach: bool = False, wait: float = 60.0, register_again: bool = False) -> int:
    """``farcall-endpoint start NAME`` for a manager: in the foreground, or as a daemon.

    Run by an ordinary account, it learns its owner first (``owner.py``), while the operator's
    token is still at hand: the detached daemon gets no token once the endpoint is registered.
    """
    privileged = check_privileges()
    if detach:
        stored = load_registration(directory)
        if not privileged and stored is not None and load_owner(directory, stored.endpoint_id) is None:
            resolve_owner(directory, broker_url, stored.endpoint_id, name)
        started = daemon.start_detached(name, directory, wait, register_again=register_again)
        state = (f"as pid {started.pid}; not connected to the broker yet" if started.endpoint_id
                 is None else f"({started.endpoint_id}) as pid {started.pid}")
        print(f"started multi-user endpoint {name} {state}; log: {started.log}")
        return 0
    lockdown.make_undumpable()
    with daemon.pid_file(directory), daemon.hooks(config.endpoint_setup, config.endpoint_teardown,
                                                  directory):
        registration = ensure_registered(directory, broker_url, config.display_name or name,
                                         register_again=register_again)
        owner = None if privileged else resolve_owner(directory, broker_url,
                                                      registration.endpoint_id, name)
        lockdown.drop_user_token()

        def on_welcome(welcome: Welcome) -> None:
            nonlocal registration
            registration = confirm(directory, registration, welcome.broker_id)

        manager = UserEndpointManager(name, directory, config, broker_url,
                                      endpoint_id=registration.endpoint_id,
                                      privileged=privileged, owner=owner)
        agent = Agent(
            broker_url, registration.endpoint_id, registration.credential, ManagerEngine(),
            heartbeat_period=config.heartbeat_period, stop_timeout=config.stop_timeout,
            display_name=config.display_name or name,
            on_status=lambda snapshot: daemon.write_status(directory, snapshot),
            on_welcome=on_welcome,
            reload_credential=lambda: stored_credential(directory, registration.endpoint_id),
            multi_user=True, user_config_schema=manager.schema,
            on_start_user_endpoint=manager.request_start,
        )
        log.info("starting multi-user endpoint %s (%s)", name, registration.endpoint_id)
        manager.begin()
        try:
            daemon.run_agent(agent, directory)
        except EndpointRejected as e:
            raise refused(directory, registration, e) from None
        finally:
            manager.shutdown()
    return 0
