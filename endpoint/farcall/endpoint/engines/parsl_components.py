"""``engine.provider`` and its ``launcher``: Parsl's own classes, by their class names.

The valid names are what the installed Parsl exports (``parsl.providers.__all__``,
``parsl.launchers.__all__``), so a provider Parsl adds is accepted without a change here.
A section's other keys are the class's constructor arguments. Checking records every problem
(``problems.error``) and goes on, so one ``farcall-endpoint check`` names them all.

Some providers need a package Parsl does not install (boto3 for ``AWSProvider``, kubernetes
for ``KubernetesProvider``...): the message names it and the pip command. Cloud providers
(AWS, Google Cloud, Azure) create cloud resources or call the cloud's API when constructed
(``AWSProvider`` makes a VPC), so ``prepare`` checks their arguments and packages but builds
them only at ``start``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from farcall.endpoint import problems
from farcall.endpoint.errors import EndpointConfigError

PROVIDER_KEY = "engine.provider"
LAUNCHER_KEY = "engine.provider.launcher"

EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "AWSProvider": ("aws", ("boto3",)),
    "GoogleCloudProvider": ("google-cloud", ("googleapiclient", "google.auth")),
    "AzureProvider": ("azure", ("azure.mgmt.compute", "msrestazure")),
    "KubernetesProvider": ("kubernetes", ("kubernetes",)),
}
"""Provider -> (Parsl's extra that installs what it needs, the modules it imports)."""
PIP = {"KubernetesProvider": "pip install 'farcall[kubernetes]'"}
"""farcall's own extra, where it has one; otherwise Parsl's (``pip install 'parsl[aws]'``)."""
BUILT_AT_START = frozenset({"AWSProvider", "GoogleCloudProvider", "AzureProvider"})
"""Constructing these acts on the cloud (creates a VPC, calls the API): ``prepare`` does not."""


@functools.cache
def providers() -> tuple[str, ...]:
    """Every provider class name the installed Parsl exports."""
    import parsl.providers

    return tuple(dict.fromkeys(parsl.providers.__all__))


@functools.cache
def launchers() -> tuple[str, ...]:
    """Every launcher class name the installed Parsl exports."""
    import parsl.launchers

    return tuple(dict.fromkeys(parsl.launchers.__all__))


def signature_keys(cls: type) -> list[str]:
    """The keyword arguments ``cls`` accepts, in order (the valid keys of its config section)."""
    return [name for name, p in inspect.signature(cls).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _required_keys(cls: type) -> list[str]:
    return [name for name, p in inspect.signature(cls).parameters.items()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def missing_packages(type_name: str) -> str | None:
    """What to install for provider ``type_name`` when a module it needs is missing, else None."""
    extra, modules = EXTRAS.get(type_name, ("", ()))
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing
            found = False
        if not found:
            missing.append(module)
    if not missing:
        return None
    packages = _extra_packages(extra) or missing
    command = PIP.get(type_name, f"pip install 'parsl[{extra}]'")
    return (f"{type_name} needs the package{'s' if len(packages) > 1 else ''} "
            f"{', '.join(packages)}, not installed in this endpoint's Python ({sys.executable}): "
            f"run {command} in that environment")


def _extra_packages(extra: str) -> list[str]:
    """The packages Parsl's ``extra`` installs, from Parsl's own metadata."""
    try:
        requires = importlib.metadata.requires("parsl") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    found = []
    for line in requires:
        spec, _, marker = line.partition(";")
        if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", marker):
            found.append(re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0])
    return found


def check_component(kind: str, spec: Any) -> dict[str, Any] | None:
    """Check a ``provider`` (or ``launcher``) section; record each problem with its dotted key.

    Returns the section with the keys that passed (the launcher checked too), or None when
    there is no class to build (no or an unknown ``type``).
    """
    where = LAUNCHER_KEY if kind == "launcher" else PROVIDER_KEY
    choices = launchers() if kind == "launcher" else providers()
    if not isinstance(spec, Mapping):
        problems.error(where, f"expected a mapping with a 'type' key (one of: {', '.join(choices)}), "
                              f"got {spec!r}")
        return None
    options = dict(spec)
    type_name = options.get("type")
    if type_name not in choices:
        problems.error(f"{where}.type", f"{type_name!r} is not a Parsl {kind} of the installed Parsl; "
                                        f"valid choices: {', '.join(choices)}")
        if isinstance(options.get("launcher"), Mapping) and kind == "provider":
            check_component("launcher", options["launcher"])
        return None
    if kind == "provider" and (missing := missing_packages(type_name)):
        problems.error(f"{where}.type", missing)
    cls = component_class(kind, type_name)
    valid = signature_keys(cls)
    for key in list(options):
        if key != "type" and key not in valid:
            problems.error(f"{where}.{key}", f"not an option of {type_name}; valid options: "
                                             f"{', '.join(valid)}")
            del options[key]
    for key in _required_keys(cls):
        if key not in options:
            problems.error(f"{where}.{key}", f"{type_name} needs {key} (its required options: "
                                             f"{', '.join(_required_keys(cls))})")
    if "launcher" in options:
        launcher = check_component("launcher", options["launcher"])
        if launcher is None:
            del options["launcher"]
        else:
            options["launcher"] = launcher
    return options


def component_class(kind: str, type_name: str) -> type:
    """The Parsl class a checked ``type`` names."""
    module = "parsl.launchers" if kind == "launcher" else "parsl.providers"
    cls: type = getattr(importlib.import_module(module), type_name)
    return cls


def build_launcher(spec: Mapping[str, Any]) -> Any:
    """The launcher a checked ``launcher`` section describes."""
    options = dict(spec)
    cls = component_class("launcher", str(options.pop("type")))
    try:
        return cls(**options)
    except Exception as e:  # noqa: BLE001 - Parsl raises many kinds for bad values
        raise EndpointConfigError(f"{LAUNCHER_KEY}: {cls.__name__}({_args(options)}) failed: "
                                  f"{e}") from None


def build_provider(spec: Mapping[str, Any]) -> Any:
    """The provider (with its launcher) a checked ``engine.provider`` section describes.

    Without a ``worker_init`` of its own (absent, null or blank, as a Globus Compute template's
    ``{{ worker_init|default() }}`` renders it), the job puts this interpreter's bin/ first on
    PATH, where HTEX looks for its worker pool. ``EndpointConfigError`` says what to install (a
    missing package) or to write (a missing Kubernetes config, a refused value).
    """
    options = dict(spec)
    type_name = str(options.pop("type"))
    cls = component_class("provider", type_name)
    if (missing := missing_packages(type_name)) is not None:
        raise EndpointConfigError(f"{PROVIDER_KEY}.type: {missing}")
    if "worker_init" in signature_keys(cls) and not str(options.get("worker_init") or "").strip():
        options["worker_init"] = f"export PATH={Path(sys.executable).parent}:$PATH"
    if isinstance(options.get("launcher"), Mapping):
        options["launcher"] = build_launcher(options["launcher"])
    try:
        return cls(**options)
    except Exception as e:  # noqa: BLE001 - Parsl and client libraries raise many kinds
        if type_name == "KubernetesProvider" and "config" in type(e).__module__:
            raise EndpointConfigError(
                f"{PROVIDER_KEY}: KubernetesProvider found no Kubernetes configuration ({e}): "
                "there is no kube config file ($KUBECONFIG, else ~/.kube/config) and this is not "
                "a pod with a service account. Save your cluster's config (kubectl config view "
                "--raw > ~/.kube/config) or set KUBECONFIG for the endpoint, or run the endpoint "
                "in the cluster") from None
        raise EndpointConfigError(f"{PROVIDER_KEY}: {type_name}({_args(options)}) failed: "
                                  f"{type(e).__name__}: {e}") from None


def _args(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items() if k != "launcher")


def describe(kind: str, obj: Any) -> str:
    """A built provider or launcher in one line: its class and the options that matter."""
    name = type(obj).__name__
    keys = (("partition", "queue", "account", "project", "namespace", "image", "nodes_per_block",
             "init_blocks", "min_blocks", "max_blocks", "walltime") if kind == "provider"
            else ("overrides",))
    shown = [f"{k}={getattr(obj, k)!r}" for k in keys
             if getattr(obj, k, None) not in (None, "")]
    return f"{name} ({', '.join(shown)})" if shown else name
