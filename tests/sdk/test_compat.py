"""What Globus Compute programs pass to the Executor, the Client and a batch: each argument is
honoured, or accepted with one ``CompatibilityWarning`` per process that says what farcall does
instead (``farcall.compat``). The programs themselves run in tests/integration/test_gc_programs.py."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from farcall import Executor, compat
from farcall.errors import CompatibilityWarning, TaskExecutionFailed, VersionMismatch
from farcall.serialize import (
    FUNCTION_DILL,
    FUNCTION_SOURCE,
    ComputeSerializer,
    DillCode,
    PureSourceTextInspect,
    payload_strategy,
)
from farcall.version import __version__
from tests.sdk.fake_broker import FakeBroker
from tests.sdk.helpers import Stack, wait_batch


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    """Each test sees the once-per-process warnings as a new process would."""
    compat.reset()
    yield
    compat.reset()


def compat_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CompatibilityWarning)]


def double(x: int) -> int:
    """Twice x."""
    return 2 * x


def fails(x: int) -> int:
    raise ValueError(f"no good: {x}")


# ------------------------------------------------------------------ Executor


@pytest.mark.parametrize(("name", "value"), [
    ("amqp_port", 443), ("api_burst_limit", 4), ("api_burst_window_s", 16),
    ("result_serializers", ["farcall.serialize.DillCode"]), ("batch_interval", 0.5),
    ("batch_enabled", True), ("container_id", "4b116d3c-1703-4f8f-9f6f-39921e5864df"),
])
def test_each_unused_executor_argument_warns_once_saying_what_farcall_does(
        fake: FakeBroker, name: str, value: Any) -> None:
    client = fake.client()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Executor(endpoint_id="ep", client=client, **{name: value}).shutdown()
        Executor(endpoint_id="ep", client=client, **{name: value}).shutdown()
    said = compat_warnings(caught)
    assert said == [f"Executor({name}=...) is accepted and not used: {compat.EXECUTOR[name]}"]
    assert "farcall" in said[0]


def test_executor_arguments_not_passed_do_not_warn(fake: FakeBroker) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Executor(endpoint_id="ep", client=fake.client(), label="sweep", batch_size=7).shutdown()


@pytest.mark.parametrize("name", ["amqp_port", "api_burst_limit", "api_burst_window_s",
                                  "result_serializers", "container_id"])
def test_setting_an_unused_attribute_later_warns_once_and_reads_back(
        fake: FakeBroker, name: str) -> None:
    ex = Executor(endpoint_id="ep", client=fake.client())
    assert getattr(ex, name) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setattr(ex, name, 5671)
        setattr(ex, name, 443)
    assert compat_warnings(caught) == [
        f"Executor({name}=...) is accepted and not used: {compat.EXECUTOR[name]}"]
    assert getattr(ex, name) == 443
    ex.shutdown()


def test_an_unknown_executor_argument_is_a_type_error_naming_what_it_takes(fake: FakeBroker) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) endpoint.*takes: endpoint_id"):
        Executor(endpoint="ep", client=fake.client())


def test_globus_compute_positional_order_and_uuids(fake: FakeBroker) -> None:
    client = fake.client()
    ep, group = uuid.uuid4(), uuid.uuid4()
    ex = Executor(ep, client, group, {"num_nodes": 1}, {"account": "a1"}, "sweep", 7)
    assert (ex.endpoint_id, ex.task_group_id) == (str(ep), str(group))
    assert ex.resource_specification == {"num_nodes": 1}
    assert ex.user_endpoint_config == {"account": "a1"}
    assert (ex.label, ex.batch_size) == ("sweep", 7)
    assert "label='sweep'" in repr(ex)
    ex.endpoint_id = ep
    assert ex.endpoint_id == str(ep)
    ex.shutdown()


def test_a_bad_batch_size_says_what_it_takes(fake: FakeBroker) -> None:
    with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1, got 'x'"):
        Executor(endpoint_id="ep", client=fake.client(), batch_size="x")  # type: ignore[arg-type]


def test_funcx_client_is_the_client_with_one_warning(fake: FakeBroker) -> None:
    client = fake.client()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = Executor(endpoint_id="ep", funcx_client=client)
    assert ex.client is client
    assert compat_warnings(caught) == ["Executor(funcx_client=...) is Globus Compute's old name of "
                                       "client=...: it is used as the client"]
    ex.shutdown()


def test_each_task_keeps_the_resource_specification_set_when_it_was_submitted(
        fake: FakeBroker) -> None:
    with Executor(endpoint_id="ep", client=fake.client()) as ex:
        ex.resource_specification = {"num_ranks": 2}
        first = ex.submit(double, 1)
        spec = {"num_ranks": 4}
        ex.resource_specification = spec
        second = ex.submit(double, 2)
        spec["num_ranks"] = 8  # changing the dict in place reaches no task already submitted
        for future in (first, second):
            fake.finish(_task_id(future), 0)
    assert [t["resource_specification"] for t in fake.submitted.values()] == [
        {"num_ranks": 2}, {"num_ranks": 4}]
    assert ex.task_count_submitted == 2


def test_a_bad_resource_specification_set_later_is_refused_at_once(fake: FakeBroker) -> None:
    ex = Executor(endpoint_id="ep", client=fake.client())
    with pytest.raises(ValueError, match="resource_specification"):
        ex.resource_specification = {"num_nodes": object()}
    ex.shutdown()


def test_the_serializers_code_strategy_is_how_functions_are_sent(fake: FakeBroker) -> None:
    serializer = ComputeSerializer(strategy_code=PureSourceTextInspect())
    with Executor(endpoint_id="ep", client=fake.client(), serializer=serializer) as ex:
        assert ex.serializer is serializer
        fake.finish(_task_id(ex.submit(double, 1)), 2)
    [registered] = fake.calls("/functions")
    assert payload_strategy(registered["function"]) == FUNCTION_SOURCE


def test_a_serializer_that_is_not_one_is_a_type_error(fake: FakeBroker) -> None:
    with pytest.raises(TypeError, match="serializer must be a ComputeSerializer"):
        Executor(endpoint_id="ep", client=fake.client(), serializer="dill")  # type: ignore[arg-type]


def test_executor_register_function_registers_once_and_takes_a_known_id(fake: FakeBroker) -> None:
    with Executor(endpoint_id="ep", client=fake.client()) as ex:
        first = ex.register_function(double)
        assert ex.register_function(double) == first
        assert ex.register_function(fails, function_id="known-id") == "known-id"
        fake.finish(_task_id(ex.submit(fails, 1)), 0)
    assert len(fake.calls("/functions")) == 1
    assert [t["function_id"] for t in fake.submitted.values()] == ["known-id"]


def _task_id(future: Any) -> str:
    from harness.procs import wait_until

    return str(wait_until(lambda: future.task_id, 10, "the task to be sent"))


# ------------------------------------------------------------------ Client


@pytest.mark.parametrize(("name", "value"), [
    ("environment", "production"), ("local_compute_services", True), ("app", object()),
    ("authorizer", object()), ("login_manager", object()), ("data_serialization_strategy", "x"),
])
def test_each_unused_client_argument_warns_once(fake: FakeBroker, name: str, value: Any) -> None:
    from farcall import Client

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            Client(broker_url="http://127.0.0.1:9", token="fcu_x", **{name: value}).close()
    assert compat_warnings(caught) == [
        f"Client({name}=...) is accepted and not used: {compat.CLIENT[name]}"]


def test_an_unknown_client_argument_is_ignored_with_a_warning_as_globus_compute_does() -> None:
    from farcall import Client

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Client(broker_url="http://127.0.0.1:9", token="fcu_x", funcx_service_address="x").close()
    assert compat_warnings(caught) == ["Client(funcx_service_address=...) is not an argument "
                                       "farcall knows, nor one of Globus Compute's current Client: "
                                       "it is ignored"]


def test_the_clients_code_strategy_is_how_it_registers_functions(fake: FakeBroker) -> None:
    client = fake.client()
    client.code_strategy = "dill"
    client.register_function(double)
    with Executor(endpoint_id="ep", client=client) as ex:
        fake.finish(_task_id(ex.submit(fails, 1)), 0)
    assert [payload_strategy(b["function"]) for b in fake.calls("/functions")] == [
        FUNCTION_DILL, FUNCTION_DILL]


def test_client_takes_a_code_serialization_strategy_and_refuses_a_data_one() -> None:
    from farcall import Client

    client = Client(broker_url="http://127.0.0.1:9", token="fcu_x",
                    code_serialization_strategy=DillCode())
    assert client.code_strategy == "dill"
    with pytest.raises(TypeError, match=r"code_serialization_strategy must be one of CombinedCode\(\)"):
        Client(broker_url="http://127.0.0.1:9", token="fcu_x", code_serialization_strategy="dill")


def test_version_check_names_both_versions_when_the_series_differ(fake: FakeBroker) -> None:
    client = fake.client()
    fake.script("GET", "/health", 200, {"status": "ok", "version": __version__})
    client.version_check()
    fake.script("GET", "/health", 200, {"status": "ok", "version": "7.0.0"})
    with pytest.raises(VersionMismatch, match=rf"broker runs farcall 7.0.0 and this SDK is "
                                              rf"farcall {__version__}.*pip install 'farcall==7.0.0'"):
        client.version_check()
    fake.script("GET", "/health", 200, {"status": "ok", "version": __version__})
    with pytest.raises(VersionMismatch, match="the endpoint runs farcall 9.1"):
        client.version_check(endpoint_version="9.1")


def test_register_function_arguments(fake: FakeBroker) -> None:
    client = fake.client()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        function_id = client.register_function(double, public=True, metadata={"python_version": "3"},
                                                group=str(uuid.uuid4()), searchable=False,
                                                ha_endpoint_id="ep", container_uuid="c")
    assert sorted(w.split("(")[1].split("=")[0] for w in compat_warnings(caught)) == [
        "container_uuid", "group", "ha_endpoint_id", "metadata", "searchable"]
    assert fake.calls("/functions")[0]["description"] == "Twice x."  # the docstring, as GC does
    assert fake.calls(f"/functions/{function_id}/share") == [{"public": True}]


def test_create_batch_in_globus_computes_order_and_its_unused_arguments(fake: FakeBroker) -> None:
    client = fake.client()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = client.create_batch(uuid.uuid4(), {"num_nodes": 1}, {"account": "a1"},
                                    create_websocket_queue=True, result_serializers=["x"])
    assert len(compat_warnings(caught)) == 2
    assert batch.user_endpoint_config == {"account": "a1"}
    batch.add(uuid.UUID(int=1), args=(1,), kwargs={"y": 2})
    batch.add("function-a", args=(2,))
    answer = client.batch_run(uuid.UUID(int=2), batch)
    assert set(answer) >= {"request_id", "task_group_id", "endpoint_id", "tasks"}
    assert answer["endpoint_id"] == str(uuid.UUID(int=2))
    assert list(answer["tasks"]) == [str(uuid.UUID(int=1)), "function-a"]
    assert [t["resource_specification"] for t in fake.submitted.values()] == [{"num_nodes": 1}] * 2


# ------------------------------------------------------------------ real tasks (embedded stack)


def test_get_task_has_globus_computes_keys_beside_farcalls(stack: Stack) -> None:
    client = stack.client()
    good = client.run(21, endpoint_id=stack.endpoint_id, function_id=client.register_function(double))
    bad = client.run(3, endpoint_id=stack.endpoint_id, function_id=client.register_function(fails))
    wait_batch(client, [good, bad])
    task = client.get_task(good)
    assert (task["task_id"], task["pending"], task["status"], task["result"]) == (good, False,
                                                                                 "success", 42)
    assert task["state"] == "success" and task["completion_t"] == task["completed_at"]
    failed = client.get_task(bad)
    assert failed["status"] == "failed" and isinstance(failed["exception"], ValueError)
    assert isinstance(failed["exception"], TaskExecutionFailed)
    with pytest.raises(TaskExecutionFailed) as info:
        failed["exception"].reraise()
    assert "no good: 3" in info.value.remote_data
    client.close()


def test_a_remote_exception_is_caught_as_its_own_type_and_as_task_execution_failed(
        stack: Stack) -> None:
    client = stack.client()
    with Executor(endpoint_id=stack.endpoint_id, client=client) as ex:
        error = ex.submit(fails, 5).exception(30)
    assert isinstance(error, ValueError) and isinstance(error, TaskExecutionFailed)
    assert type(error).__name__ == "ValueError" and str(error) == "no good: 5"
    assert "raise ValueError" in error.remote_data and error.task_id
    client.close()


def test_get_endpoints_by_role(stack: Stack) -> None:
    client = stack.client()
    assert [e["endpoint_id"] for e in client.get_endpoints(role="owner")] == [stack.endpoint_id]
    assert client.get_endpoints(role="shared") == []
    assert client.get_endpoint_metadata(stack.endpoint_id)["endpoint_id"] == stack.endpoint_id
    with pytest.raises(ValueError, match="role must be 'owner', 'shared' or 'any'"):
        client.get_endpoints(role="admin")
    client.close()


def test_register_source_code_runs_the_named_function(stack: Stack) -> None:
    client = stack.client()
    source = "import math\n\ndef hyp(a, b):\n    return math.hypot(a, b)\n"
    with Executor(endpoint_id=stack.endpoint_id, client=client) as ex:
        function_id = ex.register_source_code(source, "hyp")
        assert ex.submit_to_registered_function(function_id, args=(3, 4)).result(30) == 5.0
    from farcall.errors import SerializationError

    with pytest.raises(SerializationError, match="defines no top-level function 'hypot'.*hyp"):
        client.register_source_code(source, "hypot")
    client.close()


def test_worker_hardware_details_run_on_the_endpoint(stack: Stack) -> None:
    client = stack.client()
    with Executor(endpoint_id=stack.endpoint_id, client=client) as ex:
        report = ex.get_worker_hardware_details()
    assert "cpus:" in report and "host:" in report
    task_id = client.get_worker_hardware_details(stack.endpoint_id)
    assert "memory:" in wait_batch(client, [task_id])[task_id]["result"]
    client.close()


def test_docs_migrating_names_every_argument_farcall_accepts_without_using() -> None:
    """The Programs section of docs/migrating.md lists each argument of the tables here."""
    from harness import REPO

    page = (REPO / "docs" / "migrating.md").read_text()
    programs = page[page.index("## Programs"):page.index("## Endpoint configuration")]
    for table in (compat.EXECUTOR, compat.CLIENT, compat.REGISTER, compat.BATCH):
        for name in table:
            assert f"`{name}" in programs or f" {name}=" in programs or f"{name}=..." in programs, name
