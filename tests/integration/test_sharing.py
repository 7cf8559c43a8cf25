"""A lab's endpoint shared with a member, a published function: on real processes end to end.

The owner's endpoint runs with ``allowed_functions`` naming one published
function; a member it is shared with runs that function there, is refused any
other, cannot manage the endpoint, and keeps their tasks to themselves.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from farcall import Client, Executor
from farcall.errors import FunctionNotAllowed, NotFound, PermissionDenied
from tests.integration.helpers import Broker


def test_a_shared_endpoint_runs_a_members_tasks_and_keeps_them_theirs(
    broker: Broker, make_endpoint: Any, client: Client
) -> None:
    def published(x: int) -> int:  # defined here: dill sends it by value, not by module
        return x * 10

    def own(x: int) -> int:
        return x + 1

    function_id = client.register_function(published)
    endpoint_id = make_endpoint("lab", config={"allowed_functions": [function_id]}).start(client)

    name = f"member-{uuid.uuid4().hex[:6]}"
    with Client(broker_url=broker.url, token=broker.create_user(name)) as member:
        with pytest.raises(NotFound):  # not shared yet
            member.get_endpoint_status(endpoint_id)
        with pytest.warns(UserWarning, match="single-user endpoint"):
            assert client.share_endpoint(endpoint_id, name)["shared_with"] == [name]
        assert client.share_function(function_id, public=True)["public"] is True

        listed = {e["endpoint_id"]: e for e in member.get_endpoints()}
        assert listed[endpoint_id]["role"] == "shared"
        assert member.get_endpoint_status(endpoint_id)["status"] == "online"
        assert member.get_function(function_id)["role"] == "shared"

        with Executor(endpoint_id=endpoint_id, client=member) as ex:
            future = ex.submit_to_registered_function(function_id, (4,))
            assert future.result(timeout=60) == 40
            with pytest.raises(FunctionNotAllowed, match="allowed_functions"):
                ex.submit(own, 1).result(timeout=60)
        task_id = future.task_id
        assert task_id is not None
        assert member.get_task(task_id)["state"] == "success"
        with pytest.raises(NotFound):  # the endpoint's owner does not see a member's task
            client.get_task(task_id)

        for manage in (lambda: member.delete_endpoint(endpoint_id),
                       lambda: member.share_endpoint(endpoint_id, name),
                       lambda: member.delete_function(function_id)):
            with pytest.raises(PermissionDenied):
                manage()

        assert client.unshare_endpoint(endpoint_id, name)["shared_with"] == []
        with pytest.raises(NotFound):
            member.run(5, endpoint_id=endpoint_id, function_id=function_id)
        assert endpoint_id not in {e["endpoint_id"] for e in member.get_endpoints()}
    assert client.get_endpoint_status(endpoint_id)["status"] == "online"
