"""The keys every Globus Compute engine section may hold, on every farcall engine.

``max_retries_on_system_failure`` runs a task lost with its worker again; ``allowed_serializers``
refuses a task serialized another way before any worker reads it; pool keys farcall does not act
on are taken with one warning each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farcall.endpoint import problems
from farcall.endpoint.engines import build_engine, validate_engine
from farcall.endpoint.engines.base import Engine
from farcall.endpoint.engines.serializers import parse_allowlist
from farcall.endpoint.errors import WorkerLost
from farcall.endpoint.problems import ConfigProblems
from farcall.errors import DeserializationError
from farcall.serialize import serialize_function
from tests.endpoint.helpers import Collector, make_task, value_of

SOURCE_AND_JSON = ["globus_compute_sdk.serialize.PureSourceTextInspect",
                   "globus_compute_sdk.serialize.JSONData"]


def die_once(marker: str) -> str:
    """Kills its worker process the first time it runs (the marker file says it did)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return "ran again"


def double(x: int) -> int:
    return 2 * x


@pytest.fixture
def engines() -> Iterator[Callable[..., Engine]]:
    started: list[Engine] = []

    def make(**spec: Any) -> Engine:
        engine = build_engine(spec)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.shutdown(wait=False)


def run(engine: Engine, fn: Callable[..., Any], *args: Any, function: str | None = None) -> Any:
    got = Collector()
    task = make_task(fn, *args)
    if function is not None:
        task.function = function
    engine.submit(task, got.on_done, got.on_start)
    (result,) = got.wait_results([task.task_id], 60)
    return result


# ------------------------------------------------------------------ max_retries_on_system_failure


def test_a_task_lost_with_its_worker_runs_again_up_to_the_engines_retries(
    engines: Callable[..., Engine], tmp_path: Path
) -> None:
    engine = engines(type="ProcessPoolEngine", max_workers=1, max_retries_on_system_failure=1)
    result = run(engine, die_once, str(tmp_path / "died"))
    assert value_of(result) == "ran again"
    (attempt,) = result.attempts or []
    assert "WorkerLost" in attempt.error and "retry 1 of 1" in attempt.error


def test_without_retries_a_lost_worker_fails_its_task(engines: Callable[..., Engine],
                                                      tmp_path: Path) -> None:
    engine = engines(type="ProcessPoolEngine", max_workers=1)
    with pytest.raises(WorkerLost, match="the engine.s max_retries_on_system_failure"):
        value_of(run(engine, die_once, str(tmp_path / "died")))


@pytest.mark.slow
def test_the_parsl_engine_runs_a_lost_task_again_and_names_its_run_dir_by_label(
    engines: Callable[..., Engine], tmp_path: Path
) -> None:
    engine = engines(type="GlobusComputeEngine", run_dir=str(tmp_path / "runinfo"),
                     label="gc-retries", max_retries_on_system_failure=2, strategy_period=0.2,
                     heartbeat_period=1, heartbeat_threshold=5, max_workers_per_node=1,
                     encrypted=False,
                     provider={"type": "LocalProvider", "init_blocks": 1, "max_blocks": 1})

    def die_once_here(marker: str) -> str:  # by value: Parsl's workers cannot import tests/
        import os
        from pathlib import Path

        if not os.path.exists(marker):
            Path(marker).touch()
            os._exit(3)
        return "ran again"

    result = run(engine, die_once_here, str(tmp_path / "died"))
    assert value_of(result) == "ran again" and len(result.attempts or []) == 1
    (run_dir,) = (tmp_path / "runinfo").iterdir()
    assert run_dir.name.startswith("gc-retries-")  # the label names the run directory


# ------------------------------------------------------------------ allowed_serializers


def test_an_allowlist_refuses_a_function_serialized_another_way(engines: Callable[..., Engine]) -> None:
    engine = engines(type="ThreadPoolEngine", max_workers=1,
                     allowed_serializers=["globus_compute_sdk.serialize.PureSourceTextInspect",
                                          "globus_compute_sdk.serialize.DillDataBase64"])
    refused = run(engine, double, 4)  # cloudpickled by default
    with pytest.raises(DeserializationError, match=r"its function were serialized with cloudpickle "
                                                   r"\(function by value\), which this endpoint does "
                                                   r"not accept .*strategy='source'"):
        value_of(refused)
    allowed = run(engine, double, 4, function=serialize_function(double, "source"))
    assert value_of(allowed) == 8


def test_an_allowlist_of_json_data_refuses_pickled_arguments(engines: Callable[..., Engine]) -> None:
    engine = engines(type="ProcessPoolEngine", max_workers=1,
                     allowed_serializers=["globus_compute_sdk.*Code",
                                          "globus_compute_sdk.serialize.JSONData"])
    with pytest.raises(DeserializationError, match="its arguments were serialized with pickle"):
        value_of(run(engine, double, 4))


def test_the_wildcards_allow_everything() -> None:
    allowlist = parse_allowlist(["globus_compute_sdk.*Code", "globus_compute_sdk.*Data"])
    assert allowlist is not None
    assert allowlist.refusal(make_task(double, 1)) is None


@pytest.mark.parametrize(("value", "problem"), [
    (["globus_compute_sdk.serialize.DillCode"], "names no data strategy"),
    (["JSONData"], "names no code strategy"),
    (["globus_compute_sdk.serialize.MsgPackData", "globus_compute_sdk.*Code"],
     "'globus_compute_sdk.serialize.MsgPackData' is not a Globus Compute serialization strategy "
     "farcall knows; valid names: globus_compute_sdk.serialize.DillCode"),
    ("JSONData", "expected a list of names"),
])
def test_a_bad_allowlist_says_what_is_valid(value: Any, problem: str) -> None:
    with pytest.raises(ConfigProblems) as info:
        validate_engine({"type": "ProcessPoolEngine", "allowed_serializers": value})
    assert any(p.key == "engine.allowed_serializers" and problem in p.message
               for p in info.value.problems), info.value


# ------------------------------------------------------------------ pool keys


@pytest.mark.parametrize(("engine", "keys"), [
    ("ProcessPoolEngine", {"label": "ProcessPoolEngine", "mp_context": "spawn",
                           "max_tasks_per_child": 10, "initializer": "x.setup", "initargs": [1]}),
    ("ThreadPoolEngine", {"label": "ThreadPoolEngine", "thread_name_prefix": "gc",
                          "initializer": "x.setup", "endpoint_id": "e1", "working_dir": "wd"}),
])
def test_pool_keys_farcall_does_not_act_on_get_one_warning_each(engine: str,
                                                                 keys: dict[str, Any]) -> None:
    with problems.collecting(problems.Report()) as report:
        _, options = validate_engine({"type": engine, "max_workers": 2, **keys})
    assert set(keys).isdisjoint(options.model_dump())
    assert sorted(w.key for w in report.warnings) == sorted(f"engine.{k}" for k in keys)
    assert all(w.message.startswith("a Globus Compute key: ") and "farcall" in w.message
               for w in report.warnings)


def test_building_an_engine_does_not_repeat_the_warnings_the_config_gave(
    caplog: pytest.LogCaptureFixture
) -> None:
    build_engine({"type": "ThreadPoolEngine", "label": "x"})
    assert "engine.label" not in caplog.text


# ------------------------------------------------------------------ the docs


def _docs_section() -> str:
    text = (Path(__file__).parents[2] / "docs" / "endpoints.md").read_text()
    return text.split("### Globus Compute engine keys\n", 1)[1].split("\n## ", 1)[0]


def test_the_docs_describe_every_globus_compute_key_the_engines_take() -> None:
    from farcall.endpoint.engines.base import GLOBUS_KEYS
    from farcall.endpoint.engines.parsl_config import GLOBUS_PARSL_KEYS, RENAMED, ParslOptions
    from farcall.endpoint.engines.processes import ProcessPoolOptions
    from farcall.endpoint.engines.threads import ThreadPoolOptions

    section = _docs_section()
    keys = {*GLOBUS_KEYS, *GLOBUS_PARSL_KEYS, *RENAMED, *ProcessPoolOptions.globus_keys,
            *ThreadPoolOptions.globus_keys, "address", "strategy", "job_status_kwargs",
            "label", "worker_ports", "enable_mpi_mode", "mpi_launcher", "max_workers_per_block",
            *(k for k in ParslOptions.model_fields if k in ("max_retries_on_system_failure",
                                                           "allowed_serializers"))}
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for key in keys:
        assert any(f"`{key}`" in row.split(" | ")[0] for row in rows), f"no row for {key}"


def test_the_documented_globus_compute_section_loads() -> None:
    import re

    from farcall.endpoint.config import parse_config

    (block,) = re.findall(r"```yaml\n(.*?)```", _docs_section(), flags=re.S)
    config = parse_config(block)
    assert config.engine["type"] == "GlobusComputeEngine" and config.warnings == []
