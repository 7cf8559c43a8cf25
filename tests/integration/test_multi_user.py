"""A multi-user endpoint for real (issue 21), as root: one manager, local accounts made here.

The manager runs ``farcall-endpoint start site`` from a venv every account can run
(``harness/shared_venv.py``), against a broker of its own on Redis and RabbitMQ. Its users
submit with ``user_endpoint_config``; their tasks run as the accounts the identity mapping
names, in user endpoints the manager starts, stops when idle, and replaces when they die.

The tests share the site and run in file order (the last one of the site stops its manager).
The file ends with a manager that an ordinary account runs, from Globus Compute's default files
(no engine section): it serves its owner alone, as that account.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from farcall import Client
from farcall.endpoint.registration import load_registration
from farcall.errors import BrokerError, IdentityMappingError, TaskPending, UserEndpointError
from harness import REPO
from harness.procs import ManagedProcess, wait_until
from harness.shared_venv import shared_venv
from tests.integration.helpers import Broker, own_broker

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a multi-user endpoint runs as root"),
    pytest.mark.timeout(120),
]

IDLE = 5.0
"""user_endpoint_idle_seconds of the site (a refused user endpoint stops after as long)."""
TEMPLATE = """\
display_name: {{ "user endpoint of " ~ local_user }}
heartbeat_period: 1
stop_timeout: 3
engine:
  type: ProcessPoolEngine
  max_workers: {{ workers | default(1) }}
  prefetch: 4
"""
SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"workers": {"type": "integer", "minimum": 1, "maximum": 2},
                         "label": {"type": "string", "maxLength": 20}}}
MAPPING_PROGRAM = """\
#!/usr/bin/python3
import json, sys
for identity in json.load(sys.stdin)["identities"]:
    if identity.get("username") == {username!r}:
        print({account!r})
        sys.exit(0)
sys.exit(1)
"""


@dataclass
class Site:
    broker: Broker
    venv: Path
    home: Path
    env: dict[str, str]
    manager: ManagedProcess
    manager_id: str
    names: dict[str, str]
    """ada, bob, cyd -> their farcall user names (no rule maps cyd at first)."""
    accounts: dict[str, str]
    """ada, bob, cyd -> their local accounts."""
    clients: dict[str, Client]
    admin_token: str
    functions: dict[str, str] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.home / "endpoints" / "site"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "farcall-endpoint"), *args], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def user_endpoints(self) -> list[dict[str, Any]]:
        done = self.cli("status", "site", "--json")
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout).get("user_endpoints") or [])

    def user_endpoint(self, endpoint_id: str) -> dict[str, Any] | None:
        return next((e for e in self.user_endpoints() if e["endpoint_id"] == endpoint_id), None)

    def submit(self, user: str, config: dict[str, Any], *args: Any) -> str:
        client = self.clients[user]
        return client.run(*args, endpoint_id=self.manager_id, function_id=self.functions[user],
                          user_endpoint_config=config)

    def result(self, user: str, task_id: str, timeout: float = 60) -> Any:
        client = self.clients[user]

        def done() -> tuple[str, Any] | None:
            try:
                return ("value", client.get_result(task_id))
            except TaskPending:
                return None
            except Exception as e:  # noqa: BLE001 - the task's own error, raised below
                return ("error", e)

        kind, value = wait_until(done, timeout, f"task {task_id} of {user}\n"
                                 f"{self.manager.output(3000)}", interval=0.1)
        if kind == "error":
            raise value
        return value


def report(tag: str) -> dict[str, Any]:
    """The task every user runs: who it runs as, and what it can see."""
    import os
    import pwd

    path = os.path.join(os.path.expanduser("~"), f"made-by-task-{tag}")
    with open(path, "w") as f:
        f.write(tag)
    st = os.stat(path)
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "name": pwd.getpwuid(os.getuid()).pw_name, "file_owner": st.st_uid,
            "file_mode": st.st_mode & 0o777, "home": os.path.expanduser("~"),
            "agent": os.getppid(), "environ": dict(os.environ)}


def _useradd(name: str) -> None:
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)


def _userdel(name: str) -> None:
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
    subprocess.run(["userdel", "-r", name], capture_output=True)


def _write_json(path: Path, value: Any) -> None:
    """Replace the file at once (a new inode), as an administrator's editor does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _expression_mapping(pairs: dict[str, str]) -> dict[str, Any]:
    return {"DATA_TYPE": "expression_identity_mapping#1.0.0",
            "mappings": [{"source": "{username}", "match": username.replace(".", r"\."),
                          "output": account} for username, account in pairs.items()]}


@pytest.fixture(scope="module")
def site(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    venv = shared_venv()
    run = uuid.uuid4().hex[:6]
    names = {"ada": f"ada-{run}", "bob": f"bob-{run}", "cyd": f"cyd-{run}"}
    local = {"ada": f"fcmu{run}a", "bob": f"fcmu{run}b", "cyd": f"fcmu{run}c"}
    logs = tmp_path_factory.mktemp("multi-user")
    # Where every account may pass, as /etc/farcall of a site: what keeps users out of the
    # manager's files is their own modes, not a private parent directory of the test.
    home = Path(tempfile.mkdtemp(prefix="farcall-mu-", dir="/var/tmp"))
    home.chmod(0o755)
    made: list[str] = []
    try:
        for account in local.values():
            _useradd(account)
            made.append(account)
        with own_broker(service_env, logs, "multi-user",
                        settings={"FARCALL_USER_ENDPOINT_START_SECONDS": "1"}) as broker:
            admin_token = broker.create_user(f"site-admin-{run}")
            clients = {key: Client(broker_url=broker.url, token=broker.create_user(name))
                       for key, name in names.items()}
            env = dict(broker.env, FARCALL_HOME=str(home), FARCALL_TOKEN=admin_token)
            configured = subprocess.run(
                [str(venv / "bin" / "farcall-endpoint"), "configure", "site", "--multi-user",
                 "--broker-url", broker.url], env=env, capture_output=True, text=True, timeout=60)
            assert configured.returncode == 0, configured.stderr
            directory = home / "endpoints" / "site"
            config = yaml.safe_load((directory / "config.yaml").read_text())
            assert config["multi_user"] is True and "engine" not in config
            config.update(heartbeat_period=1, stop_timeout=5, user_endpoint_idle_seconds=IDLE,
                          audit_log_path=str(home / "audit.log"))
            (directory / "config.yaml").write_text(yaml.safe_dump(config))
            _write_json(directory / "identity_mapping.json", [_expression_mapping(
                {names["ada"]: local["ada"], names["bob"]: local["bob"]})])
            (directory / "user_config_template.yaml.j2").write_text(TEMPLATE)
            (directory / "user_config_schema.json").write_text(json.dumps(SCHEMA))
            (directory / "user_environment.yaml").write_text("SITE_SCRATCH: /scratch/site\n")
            manager = ManagedProcess("manager", [str(venv / "bin" / "farcall-endpoint"), "start",
                                                 "site"], env, logs / "manager.log")
            manager.start()
            wait_until(lambda: manager.alive() and (directory / "endpoint.json").exists(), 30,
                       f"the manager to register\n{manager.output(3000)}")
            registration = load_registration(directory)
            assert registration is not None
            with Client(broker_url=broker.url, token=admin_token) as admin:
                wait_until(lambda: admin.get_endpoint_status(registration.endpoint_id)["status"]
                           == "online", 30, f"the manager online\n{manager.output(3000)}")
                for name in names.values():
                    admin.share_endpoint(registration.endpoint_id, name)
            site = Site(broker, venv, home, dict(env, FARCALL_TOKEN=""), manager,
                        registration.endpoint_id, names, local, clients, admin_token)
            for key, client in clients.items():
                site.functions[key] = client.register_function(report, strategy="source")
            try:
                yield site
            finally:
                manager.stop(20)
                for client in clients.values():
                    client.close()
    finally:
        for account in made:
            _userdel(account)
        shutil.rmtree(home, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_two_users_run_as_their_own_accounts_through_one_manager(site: Site) -> None:
    tasks = {user: site.submit(user, {}, f"first-{user}") for user in ("ada", "bob")}
    for user, task_id in tasks.items():
        found = site.result(user, task_id)
        account = pwd.getpwnam(site.accounts[user])
        assert (found["uid"], found["euid"], found["gid"]) == (
            account.pw_uid, account.pw_uid, account.pw_gid)
        assert found["name"] == account.pw_name and found["home"] == account.pw_dir
        assert found["file_owner"] == account.pw_uid and found["file_mode"] == 0o600  # umask 077
        environ = found["environ"]
        assert environ["SITE_SCRATCH"] == "/scratch/site" and environ["USER"] == account.pw_name
        assert not any(k.startswith("FARCALL_TOKEN") or k == "FARCALL_EVENTS_FD" for k in environ)

        task = site.clients[user].get_task(task_id)
        assert task["endpoint_id"] != site.manager_id  # it ran on the user's own endpoint
        directory = Path(account.pw_dir) / ".farcall" / "endpoints" / f"site.{task['endpoint_id'][:8]}"
        for path in (directory.parent.parent, directory.parent, directory):
            st = path.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (account.pw_uid, 0o700), path
        assert stat.S_IMODE((directory / "endpoint.json").stat().st_mode) == 0o600
        registration = load_registration(directory)
        assert registration is not None and registration.endpoint_id == task["endpoint_id"]
        agent = psutil.Process(found["agent"])
        assert agent.uids().real == account.pw_uid
        assert registration.credential not in " ".join(agent.cmdline())  # never on a command line

    rows = {row["local_user"]: row for row in site.user_endpoints()}
    for user in ("ada", "bob"):
        row = rows[site.accounts[user]]
        assert row["state"] == "running" and row["uid"] == pwd.getpwnam(site.accounts[user]).pw_uid
        assert row["config_hash"] and row["idle_seconds"] >= 0
    listed = site.cli("list")
    assert listed.returncode == 0 and site.accounts["ada"] in listed.stdout, listed.stdout
    shown = site.cli("status", "site")
    assert "user endpoints: 2" in shown.stdout and site.accounts["bob"] in shown.stdout


def probe(paths: list[str]) -> dict[str, str]:
    """What a task gets when it tries to read each path, and to become root."""
    import os

    seen = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.read(1)
            seen[path] = "read"
        except OSError as e:
            seen[path] = type(e).__name__
    try:
        os.setuid(0)
        seen["setuid(0)"] = "became root"
    except OSError as e:
        seen["setuid(0)"] = type(e).__name__
    return seen


def test_a_task_cannot_reach_the_manager_or_another_user(site: Site) -> None:
    """ada's task tries the manager's credential, its environment and audit log, and bob's user
    endpoint's credential: every one is refused, and so is becoming root."""
    bob_home = Path(pwd.getpwnam(site.accounts["bob"]).pw_dir)
    bobs = sorted((bob_home / ".farcall" / "endpoints").glob("site.*/endpoint.json"))
    assert bobs, "bob's user endpoint ran in the first test"
    paths = [str(site.dir / "endpoint.json"), str(site.dir / "config.yaml"),
             f"/proc/{site.manager.pid}/environ", str(site.home / "audit.log"), str(bobs[0])]
    client = site.clients["ada"]
    function_id = client.register_function(probe, strategy="source")
    task_id = client.run(paths, endpoint_id=site.manager_id, function_id=function_id,
                         user_endpoint_config={})
    seen = site.result("ada", task_id)
    assert seen == {**dict.fromkeys(paths, "PermissionError"), "setuid(0)": "PermissionError"}


def test_the_audit_log_names_the_local_user_and_uid(site: Site) -> None:
    path = site.home / "audit.log"
    for user in ("ada", "bob"):
        account = pwd.getpwnam(site.accounts[user])
        wanted = f"user={account.pw_name} uid={account.pw_uid} "

        def states(wanted: str = wanted) -> set[str]:
            return {line.rsplit("state=", 1)[1] for line in path.read_text().splitlines()
                    if wanted in line}

        wait_until(lambda: {"received", "running", "success"} <= states(), 10,  # noqa: B023
                   f"audit lines of {user}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_unmapped_user_gets_identity_mapping_error_at_once(site: Site) -> None:
    task_id = site.submit("cyd", {}, "unmapped")
    endpoint_id = site.clients["cyd"].get_task(task_id)["endpoint_id"]

    def refusing() -> dict[str, Any] | None:
        row = site.user_endpoint(endpoint_id)
        return row if row is not None and row["state"] == "failed" else None

    # Shown while the manager answers for it (it lets go after a few idle seconds).
    row = wait_until(refusing, 30, f"the manager to answer for {endpoint_id}")
    assert "no rule" in row["reason"] and row["pid"] is None
    with pytest.raises(IdentityMappingError) as raised:
        site.result("cyd", task_id, timeout=30)  # answered, not left waiting
    message = str(raised.value)
    assert site.names["cyd"] in message and "identity_mapping.json" in message


def test_a_mapping_program_added_later_takes_effect_without_a_restart(site: Site) -> None:
    refused = {e["endpoint_id"] for e in site.user_endpoints() if e["state"] == "failed"}
    wait_until(lambda: not refused & {e["endpoint_id"] for e in site.user_endpoints()},
               IDLE + 15, "the refused user endpoint to stop")
    program = site.dir / "map-users"
    program.write_text(MAPPING_PROGRAM.format(username=site.names["cyd"],
                                              account=site.accounts["cyd"]))
    program.chmod(0o755)
    _write_json(site.dir / "identity_mapping.json", [
        {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [str(program)], "timeout": 10},
        _expression_mapping({site.names[k]: site.accounts[k] for k in ("ada", "bob")})])
    pid = site.manager.pid
    found = site.result("cyd", site.submit("cyd", {}, "mapped"))
    assert found["uid"] == pwd.getpwnam(site.accounts["cyd"]).pw_uid
    assert site.manager.pid == pid and site.manager.alive()


def test_two_configs_for_one_user_give_two_user_endpoints(site: Site) -> None:
    one = site.submit("ada", {}, "config-one")
    two = site.submit("ada", {"workers": 2, "label": "big"}, "config-two")
    first, second = site.result("ada", one), site.result("ada", two)
    assert first["uid"] == second["uid"] == pwd.getpwnam(site.accounts["ada"]).pw_uid
    assert first["agent"] != second["agent"]
    endpoints = {site.clients["ada"].get_task(t)["endpoint_id"] for t in (one, two)}
    assert len(endpoints) == 2
    hashes = {e["config_hash"] for e in site.user_endpoints() if e["endpoint_id"] in endpoints}
    assert len(hashes) == 2


def test_a_config_that_breaks_the_schema_is_refused_at_submission(site: Site) -> None:
    for config, said in (({"workers": 9}, "workers"), ({"nodes": 2}, "nodes")):
        with pytest.raises(BrokerError) as raised:
            site.submit("ada", config, "never")
        assert raised.value.status == 422 and said in str(raised.value)


def test_an_idle_user_endpoint_stops_and_starts_again_on_new_work(site: Site) -> None:
    first = site.result("bob", site.submit("bob", {}, "before-idle"))
    wait_until(lambda: not _running(first["agent"]), IDLE + 20, "bob's user endpoint to idle out")
    wait_until(lambda: not any(e["local_user"] == site.accounts["bob"]
                               for e in site.user_endpoints()), 10, "the manager to forget it")
    again = site.result("bob", site.submit("bob", {}, "after-idle"))
    assert again["agent"] != first["agent"] and again["uid"] == first["uid"]


def test_a_user_endpoint_killed_with_kill_9_is_replaced_and_its_task_answered(site: Site) -> None:
    before = site.result("ada", site.submit("ada", {}, "before-kill"))

    def slow(seconds: float) -> int:
        import os
        import time

        time.sleep(seconds)
        return os.getuid()

    client = site.clients["ada"]
    function_id = client.register_function(slow, strategy="source")
    task_id = client.run(3.0, endpoint_id=site.manager_id, function_id=function_id,
                         user_endpoint_config={})
    wait_until(lambda: client.get_task(task_id)["state"] == "running", 30, "the slow task to run")
    os.kill(before["agent"], signal.SIGKILL)
    assert site.result("ada", task_id, timeout=60) == pwd.getpwnam(site.accounts["ada"]).pw_uid
    after = site.result("ada", site.submit("ada", {}, "after-kill"))
    assert after["agent"] != before["agent"] and _running(after["agent"])


def test_tasks_queued_before_an_endpoint_became_multi_user_fail_saying_so(site: Site) -> None:
    """An endpoint that ran as a single-user one, then restarts as a manager: the tasks queued for
    it meanwhile were meant for its owner's account; the manager fails them, saying to submit
    again, instead of leaving them waiting for ever, and new ones run as their submitter."""
    env = dict(site.env, FARCALL_TOKEN=site.admin_token)
    cli = [str(site.venv / "bin" / "farcall-endpoint")]
    done = subprocess.run([*cli, "configure", "conv", "--engine", "ThreadPoolEngine",
                           "--broker-url", site.broker.url], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    directory = site.home / "endpoints" / "conv"
    agent = ManagedProcess("conv", [*cli, "start", "conv"], env, directory / "agent.log").start()
    wait_until(lambda: load_registration(directory) is not None, 30, f"conv\n{agent.output(2000)}")
    registration = load_registration(directory)
    assert registration is not None
    conv = registration.endpoint_id
    with Client(broker_url=site.broker.url, token=site.admin_token) as admin:
        wait_until(lambda: admin.get_endpoint_status(conv)["status"] == "online", 30, "conv online")
        agent.stop(20)
        with pytest.warns(UserWarning, match="single-user"):
            admin.share_endpoint(conv, site.names["ada"])
    client = site.clients["ada"]
    early = client.run("early", endpoint_id=conv, function_id=site.functions["ada"])

    config = yaml.safe_load((directory / "config.yaml").read_text())
    del config["engine"]
    config.update(multi_user=True, heartbeat_period=1, user_endpoint_idle_seconds=IDLE)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    for name in ("identity_mapping.json", "user_config_template.yaml.j2",
                 "user_config_schema.json", "user_environment.yaml"):
        (directory / name).write_bytes((site.dir / name).read_bytes())
    manager = ManagedProcess("conv-manager", [*cli, "start", "conv"], env,
                             directory / "manager.log").start()
    try:
        with pytest.raises(UserEndpointError, match="before it first connected"):
            site.result("ada", early, timeout=30)
        later = site.result("ada", client.run("later", endpoint_id=conv,
                                              function_id=site.functions["ada"],
                                              user_endpoint_config={}))
        assert later["uid"] == pwd.getpwnam(site.accounts["ada"]).pw_uid
    finally:
        manager.stop(20)


def test_stopping_the_manager_stops_its_user_endpoints(site: Site) -> None:
    pids = [e["pid"] for e in site.user_endpoints() if e.get("pid")]
    assert pids and all(_running(pid) for pid in pids)
    done = site.cli("stop", "site")
    assert done.returncode == 0, done.stderr
    assert not site.manager.alive()
    assert not [pid for pid in pids if _running(pid)]
    accounts = [pwd.getpwnam(a).pw_uid for a in site.accounts.values()]
    leftovers = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"]
                 and p.info["uids"].real in accounts]
    assert leftovers == []


# ------------------------------------------------------------------ a manager of an ordinary account

GC_DEFAULT = REPO / "tests" / "endpoint" / "gc_configs" / "default"


def test_an_ordinary_accounts_manager_from_globus_computes_default_files_serves_its_owner(
        service_env: dict[str, str], tmp_path: Path) -> None:
    """Globus Compute's default manager files (no engine section), started by a useradd account:
    its owner's task runs as that account in a user endpoint the manager started (Parsl workers
    from the default template); another user's task fails at once, naming the owner; the log
    says in one line what the manager does, and that the identity mapping is not read."""
    venv = shared_venv()
    run = uuid.uuid4().hex[:6]
    account = f"fcown{run}"
    _useradd(account)
    try:
        entry = pwd.getpwnam(account)
        home = Path(entry.pw_dir)
        directory = home / ".farcall" / "endpoints" / "site"
        directory.mkdir(parents=True)
        for path in GC_DEFAULT.iterdir():
            (directory / path.name).write_bytes(path.read_bytes())
        config = yaml.safe_load((directory / "config.yaml").read_text())
        assert "engine" not in config and "multi_user" not in config
        config.update(heartbeat_period=1, stop_timeout=5)
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        for path in [home / ".farcall", *(home / ".farcall").rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
            path.chmod(0o700 if path.is_dir() else 0o600)
        with own_broker(service_env, tmp_path, "own-account",
                        settings={"FARCALL_USER_ENDPOINT_START_SECONDS": "1"}) as broker:
            owner_token = broker.create_user(f"owner-{run}")
            other = Client(broker_url=broker.url, token=broker.create_user(f"other-{run}"))
            env = dict(broker.env, FARCALL_HOME=str(home / ".farcall"), HOME=str(home),
                       USER=account, LOGNAME=account, FARCALL_BROKER_URL=broker.url,
                       FARCALL_TOKEN=owner_token)
            manager = ManagedProcess(
                "own-account manager",
                ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
                 str(venv / "bin" / "farcall-endpoint"), "start", "site"],
                env, tmp_path / "manager.log", cwd=home).start()
            owner = Client(broker_url=broker.url, token=owner_token)
            try:
                wait_until(lambda: load_registration(directory) is not None, 60,
                           f"the manager to register\n{manager.output(3000)}")
                registration = load_registration(directory)
                assert registration is not None
                manager_id = registration.endpoint_id
                wait_until(lambda: owner.get_endpoint_status(manager_id)["status"] == "online",
                           30, f"the manager online\n{manager.output(3000)}")
                assert psutil.Process(manager.pid).uids().real == entry.pw_uid
                owner.share_endpoint(manager_id, f"other-{run}")

                def result(client: Client, task_id: str) -> Any:
                    def done() -> tuple[str, Any] | None:
                        try:
                            return ("value", client.get_result(task_id))
                        except TaskPending:
                            return None
                        except Exception as e:  # noqa: BLE001 - the task's own error
                            return ("error", e)

                    kind, value = wait_until(done, 90, f"task {task_id}\n{manager.output(4000)}",
                                             interval=0.1)
                    if kind == "error":
                        raise value
                    return value

                function = owner.register_function(report, strategy="source")
                task_id = owner.run("owner", endpoint_id=manager_id, function_id=function,
                                    user_endpoint_config={})
                found = result(owner, task_id)
                assert (found["uid"], found["euid"], found["name"]) == (
                    entry.pw_uid, entry.pw_uid, account)
                assert owner.get_task(task_id)["endpoint_id"] != manager_id
                assert not any(k.startswith("FARCALL_TOKEN") for k in found["environ"])

                function = other.register_function(report, strategy="source")
                refused = other.run("other", endpoint_id=manager_id, function_id=function,
                                    user_endpoint_config={})
                with pytest.raises(UserEndpointError) as raised:
                    result(other, refused)
                message = str(raised.value)
                assert f"runs as the ordinary account {account}" in message
                assert f"its owner owner-{run}" in message and f"other-{run}" in message

                log = manager.output()
                said = [line for line in log.splitlines() if "which cannot change user" in line]
                assert len(said) == 1 and f"for its owner owner-{run} only" in said[0], log[-3000:]
                assert "identity_mapping_config_path: this manager runs as the ordinary " \
                       f"account {account}" in log
                kept = json.loads((directory / "owner.json").read_text())
                assert (kept["endpoint_id"], kept["username"]) == (manager_id, f"owner-{run}")
            finally:
                manager.stop(30)
                owner.close()
                other.close()
    finally:
        _userdel(account)
