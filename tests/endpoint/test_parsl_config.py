"""The Parsl engines' ``engine:`` section in Globus Compute's shapes, and ``prepare``.

Addresses resolve as ``parsl.addresses`` resolves them; strategies, labels and the executor
arguments older Parsl named differently map onto farcall's keys; every provider and launcher
the installed Parsl exports is accepted; ``prepare`` builds without starting anything.
"""

from __future__ import annotations

import functools
import socket
import sys
from pathlib import Path
from typing import Any

import parsl.launchers
import parsl.providers
import psutil
import pytest

from farcall.endpoint import problems
from farcall.endpoint.engines import addresses, build_engine, validate_engine
from farcall.endpoint.engines.parsl import MPIEngine, ParslEngine
from farcall.endpoint.engines.parsl_components import launchers, missing_packages, providers
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.problems import ConfigProblems, Problem
from tests.endpoint.kube_fake import FakeKubeAPI


def checked(spec: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The engine options a section validates to (type ParslEngine by default), and its warnings."""
    with problems.collecting(problems.Report()) as report:
        _, options = validate_engine({"type": "ParslEngine", **spec})
    return options.model_dump(), report.warnings


def refused(spec: dict[str, Any]) -> list[str]:
    """Every problem of a section, as the lines a check prints."""
    with pytest.raises(ConfigProblems) as info:
        validate_engine({"type": "ParslEngine", **spec})
    return [str(p) for p in info.value.problems]


# ------------------------------------------------------------------ address


@pytest.mark.parametrize("address", [
    "10.0.0.5", "login1.cluster.org", {"type": "address_by_interface", "ifname": "ib0"},
    {"type": "address_by_route"}, {"type": "address_by_hostname"}, {"type": "address_by_query"},
    {"type": "address_by_query", "timeout": 5},
])
def test_every_address_form_parsl_has_is_accepted(address: Any) -> None:
    options, _ = checked({"address": address})
    assert options["address"] == address


@pytest.mark.parametrize(("address", "problem"), [
    ({"type": "address_by_interfac", "ifname": "ib0"},
     "engine.address.type: 'address_by_interfac' is not one of Parsl's address functions"),
    ({"type": "address_by_interface"}, "engine.address.ifname: address_by_interface needs ifname"),
    ({"type": "address_by_route", "ifname": "ib0"},
     "engine.address.ifname: not an argument of address_by_route"),
    (["10.0.0.5"], "engine.address: ['10.0.0.5'] is not an address"),
    ("", "engine.address: empty address"),
])
def test_a_bad_address_says_which_forms_are_accepted(address: Any, problem: str) -> None:
    (line,) = refused({"address": address})
    assert line.startswith(problem)
    if "not an argument" not in problem and "needs" not in problem:
        assert "{type: address_by_interface, ifname: ...}" in line and "{type: address_by_route}" in line


def test_addresses_resolve_as_parsl_resolves_them() -> None:
    import parsl.addresses

    assert addresses.resolve({"type": "address_by_interface", "ifname": "lo"},
                             on_this_host=True) == "127.0.0.1"
    assert addresses.resolve({"type": "address_by_route"}, on_this_host=True) == \
        parsl.addresses.address_by_route()
    assert addresses.resolve({"type": "address_by_hostname"}, on_this_host=True) == \
        parsl.addresses.address_by_hostname()
    assert addresses.resolve("10.1.2.3", on_this_host=True) == "10.1.2.3"
    assert addresses.resolve({"type": "address_by_query"}, on_this_host=False,
                             networked=False) is None  # never asks the web service in a check


def test_an_interface_this_host_lacks_is_a_warning_in_a_check_and_an_error_at_start() -> None:
    here = sorted(psutil.net_if_addrs())
    spec = {"type": "address_by_interface", "ifname": "ib7"}
    with problems.collecting(problems.Report()) as report:
        assert addresses.resolve(spec, on_this_host=False) is None
    (warning,) = report.warnings
    assert warning.key == "engine.address" and "interface 'ib7' is not on this host" in warning.message
    assert all(name in warning.message for name in here)
    with pytest.raises(EndpointConfigError, match=r"engine.address: interface 'ib7' is not on this "
                                                  r"host .* the interfaces here are: .*lo \(127.0.0.1\)"):
        addresses.resolve(spec, on_this_host=True)
    with problems.collecting(problems.Report()) as report, addresses.resolving_here():
        assert addresses.must_resolve_here()
        addresses.resolve(spec, on_this_host=addresses.must_resolve_here())
    assert [p.key for p in report.errors] == ["engine.address"] and not report.warnings


def test_a_remote_provider_on_loopback_is_warned_about(tmp_path: Path) -> None:
    engine = build_engine({"type": "ParslEngine", "run_dir": str(tmp_path),
                           "provider": {"type": "CondorProvider"}})
    with problems.collecting(problems.Report()) as report:
        built = engine.prepare()
    assert built["address"] == "127.0.0.1"
    (warning,) = report.warnings
    assert warning.key == "engine.address"
    assert "CondorProvider starts workers on other machines" in warning.message


# ------------------------------------------------------------------ strategy and friends


@pytest.mark.parametrize(("spec", "expected"), [
    ({"strategy": "simple"}, ("simple", 120.0, 1.0)),
    ({"strategy": "none"}, ("none", 120.0, 1.0)),
    ({"strategy": None}, ("htex_auto_scale", 120.0, 1.0)),
    ({"strategy": {"type": "SimpleStrategy", "max_idletime": 90}}, ("simple", 90, 1.0)),
    ({"strategy": {"type": "SimpleStrategy", "max_idletime": 30, "interval": 2}}, ("simple", 30, 2)),
    ({"job_status_kwargs": {"max_idletime": 45, "strategy_period": 3}}, ("htex_auto_scale", 45, 3)),
    ({"job_status_kwargs": {"strategy": "none"}}, ("none", 120.0, 1.0)),
    ({"strategy": "simple", "job_status_kwargs": {"strategy": "simple", "max_idletime": 10}},
     ("simple", 10, 1.0)),
])
def test_strategy_in_every_globus_compute_shape(spec: dict[str, Any],
                                                expected: tuple[str, float, float]) -> None:
    options, warnings = checked(spec)
    assert (options["strategy"], options["max_idletime"], options["strategy_period"]) == expected
    assert warnings == []


@pytest.mark.parametrize(("spec", "problem"), [
    ({"strategy": "elastic"}, "engine.strategy: 'elastic' is not one of Parsl's strategies; "
                              "valid choices: htex_auto_scale, simple, none"),
    ({"strategy": {"type": "Elastic"}}, "engine.strategy.type: 'Elastic' is not a strategy"),
    ({"strategy": {"type": "SimpleStrategy", "max_idle": 5}},
     "engine.strategy.max_idle: not an option of SimpleStrategy (its options: max_idletime, interval)"),
    ({"job_status_kwargs": {"monitoring": True}},
     "engine.job_status_kwargs.monitoring: not a JobStatusPoller option farcall takes"),
    ({"max_idletime": 60, "job_status_kwargs": {"max_idletime": 30}},
     "engine.job_status_kwargs.max_idletime: sets max_idletime to 30, but engine.max_idletime "
     "sets it to 60: keep one of them"),
])
def test_a_bad_strategy_names_its_key(spec: dict[str, Any], problem: str) -> None:
    (line,) = refused(spec)
    assert line.startswith(problem)


def test_label_names_the_executor_and_its_run_directories(tmp_path: Path) -> None:
    engine = build_engine({"type": "GlobusComputeEngine", "label": "Midway@RCC.UChicago",
                           "run_dir": str(tmp_path)})
    assert isinstance(engine, ParslEngine)
    _, executor, _ = engine._build(starting=False)
    assert executor.label == "Midway@RCC.UChicago"
    (line,) = refused({"label": "a/b"})
    assert line.startswith("engine.label: names directories and batch jobs: write it without '/'")


def test_executor_arguments_older_parsl_named_differently_are_mapped_with_one_warning() -> None:
    options, warnings = checked({"worker_ports": [50100, 50101], "max_workers": 3,
                                 "worker_port_range": [50000, 50500],
                                 "interchange_port_range": [51000, 51500]})
    assert options["worker_port"] == 50100 and "worker_ports" not in options
    assert options["max_workers_per_node"] == 3 and "max_workers" not in options
    assert options["worker_port_range"] == (50000, 50500)
    assert [w.key for w in warnings] == ["engine.max_workers", "engine.worker_ports"]
    assert "farcall uses worker_port: 50100" in warnings[1].message
    (line,) = refused({"worker_ports": [1, 2], "worker_port": 3})
    assert line.startswith("engine.worker_ports: set both worker_ports and worker_port")


def test_heartbeats_and_ports_reach_the_executor(tmp_path: Path) -> None:
    engine = build_engine({"type": "GlobusComputeEngine", "run_dir": str(tmp_path),
                           "heartbeat_threshold": 200, "heartbeat_period": 15, "encrypted": False,
                           "worker_port_range": [50000, 50500], "available_accelerators": 2})
    assert isinstance(engine, ParslEngine)
    _, htex, _ = engine._build(starting=False)
    assert (htex.heartbeat_threshold, htex.heartbeat_period, htex.encrypted) == (200, 15, False)
    assert htex.worker_port_range == (50000, 50500) and htex.available_accelerators == ["0", "1"]


def test_mpi_keys_belong_to_the_mpi_engine() -> None:
    for key, value in (("max_workers_per_block", 2), ("enable_mpi_mode", True), ("mpi_launcher", "srun")):
        (line,) = refused({key: value})
        assert line.startswith(f"engine.{key}: {key} is for MPI tasks: write type: GlobusMPIEngine")
    cls, options = validate_engine({"type": "GlobusMPIEngine", "max_workers_per_block": 2,
                                    "mpi_launcher": "srun"})
    assert cls is MPIEngine and options.model_dump()["max_workers_per_block"] == 2
    with problems.collecting(problems.Report()) as report:
        validate_engine({"type": "GlobusMPIEngine", "enable_mpi_mode": True})
    assert [w.key for w in report.warnings] == ["engine.enable_mpi_mode"]
    with pytest.raises(ConfigProblems, match="engine.max_workers_per_node: max_workers_per_node is a "
                                             "HighThroughputExecutor argument"):
        validate_engine({"type": "GlobusMPIEngine", "max_workers_per_node": 2})


def test_globus_compute_keys_farcall_does_not_act_on_get_one_warning_each() -> None:
    options, warnings = checked({"endpoint_id": "e5a4c3d2", "working_dir": "tasks",
                                 "run_in_sandbox": True})
    assert {"endpoint_id", "working_dir", "run_in_sandbox"}.isdisjoint(options)
    assert [w.key for w in warnings] == ["engine.endpoint_id", "engine.working_dir",
                                         "engine.run_in_sandbox"]
    assert "farcall runs each task in its worker's current directory" in warnings[1].message
    (line,) = refused({"executor": {"type": "HighThroughputExecutor"}})
    assert line.startswith("engine.executor: farcall builds the executor itself")


# ------------------------------------------------------------------ providers and launchers


REQUIRED: dict[str, dict[str, Any]] = {"AWSProvider": {"image_id": "ami-1", "key_name": "k"},
            "GoogleCloudProvider": {"project_id": "p", "key_file": "k.json", "region": "us-east1",
                                    "os_project": "debian-cloud", "os_family": "debian-12"},
            "AzureProvider": {"vm_reference": {}},
            "KubernetesProvider": {"image": "python:3.12"}}


@pytest.mark.parametrize("name", parsl.providers.__all__)
def test_every_provider_the_installed_parsl_ships_is_accepted(name: str) -> None:
    spec = {"provider": {"type": name, **REQUIRED.get(name, {})}}
    missing = missing_packages(name)
    if missing is None:
        checked(spec)
        return
    (line,) = refused(spec)  # only the missing package
    assert line.startswith(f"engine.provider.type: {name} needs the package")
    assert "pip install" in line


def test_providers_and_launchers_are_what_parsl_exports() -> None:
    assert set(providers()) == set(parsl.providers.__all__)
    assert {"AWSProvider", "GoogleCloudProvider", "KubernetesProvider"} <= set(providers())
    assert set(launchers()) == set(parsl.launchers.__all__)


def test_a_missing_package_is_named_with_its_pip_command() -> None:
    message = missing_packages("AWSProvider")
    assert message is not None and "AWSProvider needs the package boto3" in message
    assert "pip install 'parsl[aws]'" in message
    google = missing_packages("GoogleCloudProvider")
    assert google is not None and "google-api-python-client" in google
    assert "pip install 'parsl[google-cloud]'" in google
    assert missing_packages("SlurmProvider") is None


def test_a_required_provider_option_is_named() -> None:
    lines = refused({"provider": {"type": "AWSProvider"}})
    assert "engine.provider.image_id: AWSProvider needs image_id (its required options: " \
           "image_id, key_name)" in lines


@pytest.mark.parametrize("name", sorted(set(parsl.launchers.__all__) - {"WrappedLauncher"}))
def test_every_launcher_builds(name: str, tmp_path: Path) -> None:
    engine = build_engine({"type": "ParslEngine", "run_dir": str(tmp_path),
                           "provider": {"type": "LocalProvider", "launcher": {"type": name}}})
    assert engine.prepare()["launcher"].startswith(name)


# ------------------------------------------------------------------ prepare


def _listening_ports() -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def test_prepare_builds_everything_and_starts_nothing(tmp_path: Path, kube_api: FakeKubeAPI) -> None:
    engine = build_engine({
        "type": "GlobusComputeEngine", "run_dir": str(tmp_path / "runinfo"),
        "address": {"type": "address_by_route"}, "encrypted": False,
        "provider": {"type": "KubernetesProvider", "namespace": "science", "image": "python:3.12",
                     "init_blocks": 1, "max_blocks": 2}})
    assert isinstance(engine, ParslEngine)
    children, ports = psutil.Process().children(recursive=True), _listening_ports()
    built = engine.prepare()
    assert built["engine"] == "ParslEngine" and built["executor"] == "HighThroughputExecutor"
    assert built["provider"].startswith("KubernetesProvider (namespace='science', image='python:3.12'")
    assert "launcher" not in built  # pods start their workers themselves
    assert built["address"].endswith("(address_by_route())")
    assert kube_api.requests == []  # no pod asked for
    assert not (tmp_path / "runinfo").exists()
    assert psutil.Process().children(recursive=True) == children and _listening_ports() == ports
    assert engine.htex is None


def test_prepare_of_a_cloud_provider_does_not_construct_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import parsl.providers.aws.aws as aws

    monkeypatch.setattr(aws, "_boto_enabled", True)  # as if boto3 were installed
    monkeypatch.setattr("farcall.endpoint.engines.parsl_components.missing_packages", lambda name: None)
    constructed: list[Any] = []

    @functools.wraps(aws.AWSProvider.__init__)  # keeps the signature the check reads
    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        constructed.append(kwargs)

    monkeypatch.setattr(aws.AWSProvider, "__init__", spy)
    engine = build_engine({"type": "ParslEngine", "run_dir": str(tmp_path),
                           "address": "10.0.0.5",
                           "provider": {"type": "AWSProvider", "image_id": "ami-1", "key_name": "k",
                                        "launcher": {"type": "SingleNodeLauncher"}}})
    built = engine.prepare()
    assert built["provider"].startswith("AWSProvider (checked; built when the endpoint starts")
    assert built["launcher"] == "SingleNodeLauncher" and constructed == []


def test_a_kubernetes_provider_without_a_kube_config_is_an_error_of_prepare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    engine = build_engine({"type": "ParslEngine", "run_dir": str(tmp_path),
                           "provider": {"type": "KubernetesProvider", "image": "python:3.12"}})
    with pytest.raises(EndpointConfigError, match="KubernetesProvider found no Kubernetes "
                                                  "configuration.*set KUBECONFIG"):
        engine.prepare()


def test_the_listening_ports_helper_sees_a_listener() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        assert sock.getsockname()[1] in _listening_ports()
    finally:
        sock.close()


@pytest.mark.parametrize("worker_init", [None, "", "  "])
def test_a_blank_worker_init_puts_this_environment_on_path(worker_init: str | None) -> None:
    """A Globus Compute template's ``{{ worker_init|default() }}`` renders blank: the job
    still finds the worker pool of the endpoint's environment."""
    from farcall.endpoint.engines.parsl_components import build_provider

    provider = build_provider({"type": "LocalProvider", "worker_init": worker_init})
    assert provider.worker_init == f"export PATH={Path(sys.executable).parent}:$PATH"
    own = build_provider({"type": "LocalProvider", "worker_init": "module load x"})
    assert own.worker_init == "module load x"
