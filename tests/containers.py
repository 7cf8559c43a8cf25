"""Real podman for tests: installed when absent, configured for this machine, and a small image.

    from tests.containers import ensure_podman, ensure_image, podman, docker_shim

* ``ensure_podman()`` installs podman, runc, debootstrap and catatonit with apt-get when absent,
  writes a ``containers.conf`` and a ``storage.conf`` of its own (runc, this machine's ulimits,
  cgroupfs, its own graphroot under ``/var/tmp``: never the machine's default store) and returns
  the environment that points podman at them (``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``).
* ``ensure_image(env)`` returns the name of a Debian bookworm image (minbase with python3), built
  with ``debootstrap`` and ``podman import`` the first time (about a minute: no registry is
  reachable here) and cached as a tarball under ``/var/cache/farcall-tests``, so later runs only
  ``podman load`` it (a few seconds).
* ``docker_shim(dir)`` writes a ``docker`` command that runs podman (this machine's real
  ``docker`` client has no daemon).

Everything raises ``ContainersUnavailable`` (an AssertionError: tests fail rather than skip).
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

PODMAN_DIR = Path(os.environ.get("FARCALL_PODMAN_DIR", "/var/tmp/farcall-podman"))
IMAGE_CACHE = Path(os.environ.get("FARCALL_IMAGE_CACHE", "/var/cache/farcall-tests"))
IMAGE_VERSION = "bookworm-minbase-python3-2"
"""Change it when the recipe below changes: the cached tarball is keyed by it."""
IMAGE = f"localhost/farcall-test-worker:{IMAGE_VERSION}"
MARKER = "/etc/farcall-test-image"
"""A file only the image has (this machine runs Debian 12 too): it holds ``IMAGE_VERSION``."""
PACKAGES = ("podman", "runc", "debootstrap", "catatonit")
NEEDED = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap",
          "catatonit": "/usr/libexec/podman/catatonit"}

_lock = threading.Lock()
_env: dict[str, str] | None = None


class ContainersUnavailable(AssertionError):
    """podman or the test image could not be set up; an AssertionError so tests fail, not skip."""


def _run(args: list[str], timeout: float, env: Mapping[str, str] | None = None,
         stdin: IO[bytes] | int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=stdin,
                              env=None if env is None else dict(env))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ContainersUnavailable(f"{' '.join(args[:3])} did not finish: {e!r}") from e
    if done.returncode != 0:
        raise ContainersUnavailable(
            f"{' '.join(args[:4])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def _missing() -> list[str]:
    return [pkg for pkg, what in NEEDED.items()
            if not (os.path.exists(what) if what.startswith("/") else shutil.which(what))]


def _hard_limit(flag: str, most: int) -> int:
    done = subprocess.run(["sh", "-c", f"ulimit -H{flag}"], capture_output=True, text=True)
    value = done.stdout.strip()
    return most if value in ("", "unlimited") else min(int(value), most)


def containers_conf(nofile: int, nproc: int) -> str:
    """podman's containers.conf for this machine (see ENVIRONMENT: crun refuses the cgroup
    layout, the default ulimits exceed what the machine allows)."""
    return ("[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{PODMAN_DIR / "tmp"}"\n')


def _write_configs() -> dict[str, str]:
    PODMAN_DIR.mkdir(parents=True, exist_ok=True)
    containers_path = PODMAN_DIR / "containers.conf"
    containers_path.write_text(containers_conf(_hard_limit("n", 1 << 20), _hard_limit("u", 32768)))
    storage_conf = PODMAN_DIR / "storage.conf"
    storage_conf.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{PODMAN_DIR / "root"}"\n'
        f'runroot = "{PODMAN_DIR / "run"}"\n')
    return {"CONTAINERS_CONF": str(containers_path), "CONTAINERS_STORAGE_CONF": str(storage_conf)}


def ensure_podman(timeout: float = 300) -> dict[str, str]:
    """Install (when absent) and configure podman once per process; the environment for it."""
    global _env
    with _lock:
        if _env is None:
            if missing := _missing():
                apt = ["apt-get", "-o", "DPkg::Lock::Timeout=180"]
                _run([*apt, "install", "-y", "--no-install-recommends", *PACKAGES], timeout,
                     env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
                if missing := _missing():
                    raise ContainersUnavailable(f"apt-get installed {PACKAGES} but {missing} "
                                                "are still missing")
            _env = _write_configs()
        return dict(_env)


def podman(env: Mapping[str, str], *args: str, timeout: float = 60,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` with the test configuration."""
    full = dict(os.environ, **env)
    if check:
        return _run(["podman", *args], timeout, env=full)
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=full)


def running_containers(env: Mapping[str, str], prefix: str = "") -> list[str]:
    """Names of the containers podman runs now (those starting with ``prefix``)."""
    out = podman(env, "ps", "--format", "{{.Names}}").stdout.split()
    return [name for name in out if name.startswith(prefix)]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _debian_mirror() -> str:
    """The Debian mirror apt uses here (no other is reachable)."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        text = source.read_text()
        for block in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        match = re.search(r"^deb\s+(\S+)\s+bookworm\s", legacy.read_text(), re.M)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def ensure_image(env: Mapping[str, str], timeout: float = 600) -> str:
    """The test image's name, loaded into the test store (built and cached the first time)."""
    tarball = IMAGE_CACHE / f"farcall-test-worker-{IMAGE_VERSION}.tar"
    with _file_lock(IMAGE_CACHE / ".lock"):
        if podman(env, "image", "exists", IMAGE, check=False).returncode == 0:
            return IMAGE
        if not tarball.is_file():
            with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="farcall-rootfs-") as tmp:
                rootfs = Path(tmp) / "rootfs"
                _run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm",
                      str(rootfs), _debian_mirror()], timeout)
                shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
                (rootfs / MARKER.lstrip("/")).write_text(IMAGE_VERSION + "\n")
                with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."],
                                      stdout=subprocess.PIPE) as tar:
                    _run(["podman", "import", "-", IMAGE], timeout, env=dict(os.environ, **env),
                         stdin=tar.stdout)
                part = tarball.with_suffix(".part")
                podman(env, "save", "-o", str(part), IMAGE, timeout=timeout)
                part.replace(tarball)
            return IMAGE
        podman(env, "load", "-i", str(tarball), timeout=timeout)
        return IMAGE


def docker_shim(directory: Path) -> Path:
    """A ``docker`` command in ``directory`` that runs podman with the same arguments, and
    notes each call's first argument in ``directory/calls``."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "docker"
    calls = shlex.quote(str(directory / "calls"))
    shim.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec podman "$@"\n')
    shim.chmod(0o755)
    return shim
