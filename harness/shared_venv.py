"""A virtual environment with this checkout installed that every local account can run.

Processes that drop to other Unix accounts (a multi-user endpoint's user endpoints) cannot use
the test's own interpreter when it lives in root's 0700 home (a pyenv build): they need one
made from Debian's ``/usr/bin/python3`` in a world-readable place. It is made once and kept under
``/var/cache/farcall-tests/``, keyed by ``pyproject.toml`` and by where (and how) this checkout
is installed: editable when every account can read the checkout, otherwise a copy that is
installed again whenever the sources change.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

from harness import REPO

CACHE = Path("/var/cache/farcall-tests")
SYSTEM_PYTHON = Path("/usr/bin/python3")
SOURCES = ("sdk", "broker", "endpoint")


def readable_by_everyone(path: Path) -> bool:
    """Every directory from / down to ``path`` can be entered by other accounts, and the
    checkout's files can be read by them."""
    for part in [path, *path.parents]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return False
    return all(f.stat().st_mode & stat.S_IROTH for f in (path / "pyproject.toml",
                                                        path / "sdk" / "farcall" / "__init__.py"))


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def shared_venv(extras: str = "endpoint") -> Path:
    """The venv's directory (``bin/python``, ``bin/farcall-endpoint``), made or brought up to date."""
    if not SYSTEM_PYTHON.exists():
        raise RuntimeError(f"{SYSTEM_PYTHON} is missing: apt-get install -y python3 python3-venv")
    editable = readable_by_everyone(REPO)
    key = hashlib.sha256(b"\0".join([
        (REPO / "pyproject.toml").read_bytes(), str(REPO).encode(), extras.encode(),
        b"editable" if editable else b"copy"])).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE, 0o755)
    venv = CACHE / f"venv-{key}"
    with open(CACHE / f"venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / ".farcall-installed"
        wanted = "editable" if editable else _sources_digest()
        if stamp.is_file() and stamp.read_text() == wanted:
            return venv
        if not (venv / "bin" / "python").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        if editable:
            subprocess.run([*pip, "-e", f"{REPO}[{extras}]"], check=True)
        else:
            copy = venv / "src"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
                ".git", ".venv", "__pycache__", "*.egg-info", "build"))
            subprocess.run([*pip, "--force-reinstall", "--no-deps", str(copy)], check=True)
            subprocess.run([*pip, f"{copy}[{extras}]"], check=True)
            shutil.rmtree(copy)
        subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
        stamp.write_text(wanted)
    return venv
