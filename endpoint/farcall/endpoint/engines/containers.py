"""Start an engine's workers inside a container image: the command line for each runtime.

``ProcessPoolEngine`` wraps each worker process's command, ``ParslEngine`` each block's worker
pool command (through ``worker_env``, in the job), so both engines run their workers the same
way, from the same three ``engine:`` keys (Globus Compute's names):

- ``container_type``: ``podman``, ``podman-hpc`` (NERSC's podman, same syntax), ``docker``,
  ``apptainer``, ``singularity`` or ``custom``;
- ``container_uri``: the image (for ``custom`` it is part of the template instead);
- ``container_cmd_options``: more options for the runtime's ``run``/``exec``, or, for
  ``custom``, the whole command as a template in which ``{EXECUTOR_LAUNCH_CMD}`` is the
  worker's command and ``{EXECUTOR_RUNDIR}`` the engine's run directory.

The image provides the operating system; the worker's Python environment is the endpoint's
own, mounted read-only at the same paths (``python_mounts``), so console scripts' absolute
shebangs and the task's pickled references resolve as outside. The run directory (the process
engine's worker sockets, Parsl's worker logs) is mounted writable at the same path. Workers
use the host's network, so they reach the agent (or Parsl's interchange) on 127.0.0.1, and get
the scrubbed worker environment (``worker_env``) and nothing else. podman and docker
containers are named, so a worker that is killed (a cancelled task, a stopped engine) has its
container removed too: killing the ``podman run`` client alone leaves the container running.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from pydantic import Field, model_validator

from farcall.endpoint import problems
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.worker_env import WorkerEnvOptions

log = logging.getLogger(__name__)

CONTAINER_TYPES = ("podman", "podman-hpc", "docker", "apptainer", "singularity", "custom")
PODMAN_TYPES = ("podman", "podman-hpc")
NAMED_TYPES = (*PODMAN_TYPES, "docker")
"""Runtimes whose containers farcall names, and so can remove by name."""
RUNDIR = "{EXECUTOR_RUNDIR}"
"""In a ``custom`` template: the engine's run directory (mount it at the same path)."""
LAUNCH_CMD = "{EXECUTOR_LAUNCH_CMD}"
"""In a ``custom`` template: the worker's command, as shell words (put it as a bare word)."""
RUNTIME_NAMES = frozenset({"XDG_RUNTIME_DIR", "REGISTRY_AUTH_FILE", "TMPDIR"})
RUNTIME_PREFIXES = ("CONTAINERS_", "CONTAINER_", "DOCKER_", "PODMAN_", "BUILDAH_", "APPTAINER_",
                    "SINGULARITY_")
"""The runtime client's own settings (which store, which daemon), taken from the agent's (or
the job's) environment for the client only: the container gets the worker environment."""
SYSTEM_PREFIXES = frozenset({"/", "/usr", "/usr/local"})
"""A Python installed here is the system's: its standard library is mounted, not the prefix
(mounting ``/usr`` over the image's would replace the image)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class Container:
    """Which runtime runs workers in which image, with what extra options."""

    type: str
    uri: str | None = None
    options: str = ""

    @property
    def named(self) -> bool:
        """Its containers have names the engine gives, and can be removed by name."""
        return self.type in NAMED_TYPES

    @property
    def program(self) -> str:
        """The command that must be on PATH (the runtime, or a custom template's first word)."""
        if self.type == "custom":
            words = shlex.split(self.options)
            return words[0] if words else ""
        return self.type

    def command(self, argv: Sequence[str], *, env: Mapping[str, str], name: str, run_dir: str,
                mounts: Iterable[str], source: Mapping[str, str] | None = None,
                ) -> tuple[list[str], dict[str, str]]:
        """The runtime's command that runs ``argv`` in the image, and the runtime's environment.

        ``env`` is the worker environment: what the container gets. ``source`` (default: this
        process's environment) gives the runtime client its own settings (``RUNTIME_PREFIXES``).
        ``name`` names the container (podman, docker); ``mounts`` are mounted read-only and
        ``run_dir`` writable, each at its own path.
        """
        source = os.environ if source is None else source
        client_env = {k: v for k, v in source.items()
                      if k in RUNTIME_NAMES or k.startswith(RUNTIME_PREFIXES)}
        client_env.update(env)
        extra = shlex.split(self.options)
        if self.type in NAMED_TYPES:
            words = [self.type, "run", "--rm", "--init", "--network", "host", "--name", name]
            for path in mounts:
                words += ["-v", f"{path}:{path}:ro"]
            words += ["-v", f"{run_dir}:{run_dir}"]
            for var in sorted(env):  # the value travels in the client's environment, not here
                words += ["-e", var]
            return [*words, *extra, str(self.uri), *argv], client_env
        if self.type in ("apptainer", "singularity"):
            words = [self.type, "exec", "--cleanenv"]
            for path in mounts:
                words += ["--bind", f"{path}:{path}:ro"]
            words += ["--bind", f"{run_dir}:{run_dir}"]
            # --cleanenv keeps the client's environment out; these set the worker's inside.
            env_prefix = "APPTAINERENV_" if self.type == "apptainer" else "SINGULARITYENV_"
            client_env.update({env_prefix + k: v for k, v in env.items()})
            return [*words, *extra, str(self.uri), *argv], client_env
        template = self.options.replace(RUNDIR, shlex.quote(run_dir))
        return shlex.split(template.replace(LAUNCH_CMD, shlex.join(argv))), client_env

    def remove_commands(self, names: Sequence[str]) -> list[list[str]]:
        """Commands that stop and remove these containers at once (none for unnamed types:
        killing their command stops them)."""
        if not names or not self.named:
            return []
        if self.type in PODMAN_TYPES:
            return [[self.type, "rm", "-f", "-t", "0", *names]]
        # docker's rm -f takes no timeout; kill (SIGKILL) is immediate, and --rm removes it.
        return [["docker", "kill", *names], ["docker", "rm", "-f", *names]]

    def remove(self, names: Sequence[str], env: Mapping[str, str] | None = None,
               timeout: float = 30) -> None:
        """Stop and remove ``names`` (gone ones are no error): never leave a worker's container
        running after its worker is killed."""
        for cmd in self.remove_commands(names):
            try:
                subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=timeout,
                               env=None if env is None else dict(env))
            except (OSError, subprocess.TimeoutExpired) as e:
                log.warning("could not remove containers %s (%s): %s", ", ".join(names),
                            shlex.join(cmd), e)

    def check_runtime(self, path: str | None = None) -> None:
        """Raise ``EndpointConfigError`` when the runtime's command is not on PATH."""
        if not self.program or shutil.which(self.program, path=path) is None:
            raise EndpointConfigError(
                f"engine.container_type: {self.type} needs the command {self.program!r} on the "
                "endpoint's PATH; install it or change container_type")

    def encode(self, run_dir: str) -> str:
        """This container and a run directory in a form with no braces or spaces, for Parsl's
        launch command (``decode``)."""
        return base64.urlsafe_b64encode(json.dumps({**asdict(self), "run_dir": run_dir}).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> tuple[Container, str]:
        fields = json.loads(base64.urlsafe_b64decode(text.encode()))
        run_dir = fields.pop("run_dir")
        return cls(**fields), str(run_dir)


def container_name() -> str:
    """A new container's name: unique, and findable (``podman ps --filter name=farcall-``)."""
    return f"farcall-worker-{uuid.uuid4().hex[:12]}"


class ContainerOptions(WorkerEnvOptions):
    """``engine:`` keys of engines that can start their workers in a container."""

    container_type: str | None = Field(
        default=None, description="podman, podman-hpc, docker, apptainer, singularity or custom")
    container_uri: str | None = Field(default=None, description="the image the workers run in")
    container_cmd_options: str | None = Field(
        default=None, description="more options for the runtime; for custom, the whole command "
                                  f"with {LAUNCH_CMD} (and {RUNDIR}) in it")

    @model_validator(mode="after")
    def _check_container(self) -> ContainerOptions:
        found = self._container_problem()
        if found is not None:
            problems.error(*found)
        return self

    def container(self) -> Container | None:
        """The container the workers run in, or None; ``EndpointConfigError`` for a bad set."""
        found = self._container_problem()
        if found is not None:
            raise EndpointConfigError(f"{found[0]}: {found[1]}")
        if self.container_type is None:
            return None
        return Container(self.container_type, self.container_uri, self.container_cmd_options or "")

    def _container_problem(self) -> tuple[str, str] | None:
        """The first problem of the three container keys: (dotted key, what to write)."""
        kind, uri, options = self.container_type, self.container_uri, self.container_cmd_options
        if kind is None:
            if uri is not None or options is not None:
                return ("engine.container_type", "container_uri and container_cmd_options need "
                        f"a container_type ({', '.join(CONTAINER_TYPES)})")
            return None
        if kind not in CONTAINER_TYPES:
            return ("engine.container_type", f"{kind!r} is not a container type; valid choices: "
                    f"{', '.join(CONTAINER_TYPES)}")
        try:
            shlex.split(options or "")
        except ValueError as e:
            return ("engine.container_cmd_options", f"not valid shell words ({e}): {options!r}")
        if kind == "custom":
            if not options or LAUNCH_CMD not in options:
                return ("engine.container_cmd_options", "container_type custom needs the whole "
                        f"command here, with {LAUNCH_CMD} where the worker's command goes (and "
                        f"{RUNDIR} for the run directory to mount), e.g. 'podman run --rm "
                        f"-v {RUNDIR}:{RUNDIR} IMAGE {LAUNCH_CMD}'")
        elif not uri:
            return ("engine.container_uri", f"container_type {kind} needs the image to run the "
                    "workers in (e.g. docker.io/library/python:3.11 or, for apptainer, a .sif file)")
        return None


# ------------------------------------------------------------------- what is mounted


@functools.cache
def python_mounts() -> tuple[str, ...]:
    """The paths the worker's Python needs, mounted read-only at the same paths in the image:
    the environment's prefixes, and farcall's own packages when they live outside them (an
    editable install). A system Python (``/usr``) gives only its standard library and binary."""
    paths: list[str] = []
    for prefix in dict.fromkeys([sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]):
        if os.path.realpath(prefix) not in SYSTEM_PREFIXES:
            paths.append(os.path.realpath(prefix))
            continue
        std = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
        paths += [std["stdlib"], std["platstdlib"], os.path.realpath(sys.executable)]
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            lib = os.path.join(str(sysconfig.get_config_var("LIBDIR")),
                               str(sysconfig.get_config_var("INSTSONAME")))
            if os.path.exists(lib):
                paths.append(os.path.realpath(lib))
    import farcall
    import farcall.endpoint

    for package in (farcall, farcall.endpoint):
        paths += [os.path.realpath(p) for p in package.__path__]
    return tuple(outermost(p for p in paths if os.path.exists(p)))


def outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without duplicates or paths inside another of them, in their first order."""
    kept: list[str] = []
    for path in dict.fromkeys(paths):
        if any(Path(path).is_relative_to(k) for k in kept):
            continue
        kept = [k for k in kept if not Path(k).is_relative_to(path)] + [path]
    return kept


def worker_mounts(env: Mapping[str, str]) -> list[str]:
    """``python_mounts`` and the directories on the worker's ``PYTHONPATH``."""
    extra = [os.path.realpath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return outermost([*python_mounts(), *(p for p in extra if os.path.isdir(p))])


# -------------------------------------------------------------- a Parsl block's pool


def run_pool(container: Container, run_dir: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run a Parsl worker pool's command in ``container`` and wait for it; its exit code.

    Called in the block's job (``worker_env`` with ``--container``). A provider stops a block
    with a signal to the job (LocalProvider: SIGTERM to its process group; Slurm's scancel
    too): the container is removed then, since the runtime's client may die before it could.
    """
    name = container_name()
    cmd, client_env = container.command(argv, env=env, name=name, run_dir=run_dir,
                                        mounts=worker_mounts(env))
    started: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        container.remove([name], env=client_env)
        for proc in started:
            try:
                proc.kill()
            except OSError:
                pass
        os._exit(128 + signum)

    # Before the client starts: a stop that comes at once must still remove its container.
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    started.append(subprocess.Popen(cmd, env=client_env, stdin=subprocess.DEVNULL))
    code = started[0].wait()
    container.remove([name], env=client_env)  # the client may end without its container
    return code
