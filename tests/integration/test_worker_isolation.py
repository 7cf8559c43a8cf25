"""What a task can reach on a real endpoint (issue 20): not the owner's token nor the endpoint's
credential, in its environment or the agent's; only what the operator lists; and on a shared
endpoint, nothing another user's task left in a worker."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from farcall import Client, Executor
from farcall.endpoint.registration import load_registration
from tests.integration.helpers import Broker


def test_a_task_reads_no_token_or_credential_only_the_listed_environment(
    make_endpoint: Any, client: Client, token: str
) -> None:
    """The endpoint starts with the owner's FARCALL_TOKEN (it registers with it) and another
    secret in its environment; a task reads its own environment and its agent's."""
    ep = make_endpoint(
        "reach", extra_env={"LAB_SCRATCH": "/scratch/lab", "OWNER_SECRET": "s3cret"},
        engine_spec={"type": "ProcessPoolEngine", "max_workers": 1,
                     "worker_env": {"OMP_NUM_THREADS": "3"},
                     "worker_env_passthrough": ["LAB_SCRATCH"]})
    endpoint_id = ep.start(client)
    registration = load_registration(ep.dir)
    assert registration is not None

    def reach() -> tuple[dict[str, str], bytes]:
        import os

        with open(f"/proc/{os.getppid()}/environ", "rb") as f:  # the agent's (tests run as root)
            return dict(os.environ), f.read()

    with Executor(endpoint_id=endpoint_id, client=client) as ex:
        env, agent = ex.submit(reach).result(timeout=60)
    seen = repr(env).encode() + agent
    assert token.encode() not in seen and registration.credential.encode() not in seen
    assert "FARCALL_TOKEN" not in env
    assert "OWNER_SECRET" not in env
    assert env["OMP_NUM_THREADS"] == "3" and env["LAB_SCRATCH"] == "/scratch/lab"
    assert ep.proc is not None
    assert "FARCALL_TOKEN is set in the agent's environment" in ep.proc.output()


def test_a_users_implant_never_meets_another_users_task(
    broker: Broker, make_endpoint: Any, client: Client
) -> None:
    """The owner shares a one-worker endpoint with two users. The attacker's task patches its
    worker (a module global, a monkeypatched function); the victim's next task runs in another
    process and finds neither."""
    ep = make_endpoint("shared", engine_spec={"type": "ProcessPoolEngine", "max_workers": 1,
                                              "worker_idle_seconds": 0.2})
    endpoint_id = ep.start(client)
    users = {}
    for role in ("attacker", "victim"):
        name = f"{role}-{uuid.uuid4().hex[:6]}"
        users[role] = Client(broker_url=broker.url, token=broker.create_user(name))
        with pytest.warns(UserWarning, match="single-user endpoint"):
            client.share_endpoint(endpoint_id, name)

    def implant() -> int:
        import json
        import os

        json.farcall_implant = "recorded"  # type: ignore[attr-defined]
        json.dumps = lambda *a, **k: "forged"
        return os.getpid()

    def victim() -> tuple[int, bool, str]:
        import json
        import os

        return os.getpid(), hasattr(json, "farcall_implant"), json.dumps([1])

    try:
        with Executor(endpoint_id=endpoint_id, client=users["attacker"]) as ex:
            attacker_pid = ex.submit(implant).result(timeout=60)
            assert ex.submit(victim).result(timeout=60) == (attacker_pid, True, "forged"), (
                "the attacker's own later task meets the implant: the worker is theirs")
        with Executor(endpoint_id=endpoint_id, client=users["victim"]) as ex:
            pid, implanted, dumped = ex.submit(victim).result(timeout=60)
    finally:
        for c in users.values():
            c.close()
    assert pid != attacker_pid and not implanted and dumped == "[1]"
