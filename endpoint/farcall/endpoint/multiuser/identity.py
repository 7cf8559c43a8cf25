"""Which local account a farcall user's tasks run as: ``identity_mapping.json``, and the account.

The file holds Globus Compute's identity mapping documents (a list of them, or one), so an
administrator who wrote one for Globus Compute can use it unchanged:

- ``expression_identity_mapping#1.0.0``: ``mappings`` is a list of rules ``{source, match,
  output, ignore_case?, literal?}``; the first rule whose ``match`` (anchored at both ends)
  matches its interpolated ``source`` gives the name. ``globus-identity-mapping`` evaluates them.
- ``external_identity_mapping#1.0.0``: ``command`` (a list: the program and its arguments)
  and an optional ``timeout`` in seconds (default 5). The program reads
  ``{"DATA_TYPE": "identity_mapping_input#1.0.0", "identities": [identity]}`` on stdin and is
  given ``-c <POSIX connector id> -s <endpoint id>`` after its own arguments, as Globus Compute
  does. It prints either Globus's output document (``identity_mapping_output#1.0.0``) or just
  the local name. A non-zero exit, a timeout (the program and its children are killed) or
  empty output means "no mapping". This runner is ours, not the library's: the library's
  leaves a timed-out program running and has a fixed timeout.

An identity is ``{"id", "sub", "username"}`` as the broker sends it; rules may interpolate
``{id}``, ``{sub}``, ``{identity_id}`` (the same as ``{id}``) and ``{username}``.
``IdentityMapper`` reads the file again when it changes; an invalid new file keeps the
mapping in force and logs why, once per change.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from globus_identity_mapping import ExpressionIdentityMapping
from globus_identity_mapping.errors import IdentityMappingError as LibraryMappingError
from globus_identity_mapping.errors import InvalidMappingError

from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.multiuser.errors import NoLocalAccount

__all__ = ["EXPRESSION", "EXTERNAL", "IDENTITY_FIELDS", "IdentityMapper", "LocalUser", "NoLocalAccount",
           "local_user", "parse_identity_mapping"]

log = logging.getLogger(__name__)

EXPRESSION = "expression_identity_mapping#1.0.0"
EXTERNAL = "external_identity_mapping#1.0.0"
IDENTITY_FIELDS = ("id", "sub", "identity_id", "username")
"""The identity properties a rule may interpolate."""
POSIX_CONNECTOR_ID = "145812c8-decc-41f1-83cf-bb2a85a2a70b"
"""Globus Connect Server's POSIX connector id: Globus Compute gives it to external programs."""
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 300.0
LOCAL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,255}\$?$")
"""What a mapped name may look like before it is looked up (no '/', spaces or control bytes)."""
_REFERENCE = re.compile(r"(?<!\\)(?:\\\\)*\{([^}]*)\}")

Rule = Callable[[dict[str, str]], str | None]
"""One mapping document, made callable: an identity to a local name, or None."""


# ------------------------------------------------------------------ the account


@dataclass(frozen=True)
class LocalUser:
    """A Unix account from the password database."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


def local_user(name: str) -> LocalUser:
    """The account called ``name``; ``NoLocalAccount`` says what the administrator must do."""
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise NoLocalAccount(
            f"{socket.gethostname()} has no local account named {name!r}: the administrator must "
            f"create it (for example `useradd -m {name}`), or change the identity mapping "
            "(identity_mapping.json) so that it gives an existing account") from None
    return LocalUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)


# ------------------------------------------------------------------ the file


def parse_identity_mapping(text: str, source: str, endpoint_id: str = "") -> list[Rule]:
    """The rules of an identity mapping file's text, in order; ``EndpointConfigError`` names
    ``source`` and the document at fault."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise EndpointConfigError(f"{source}: not valid JSON: {e}") from None
    documents = [raw] if isinstance(raw, dict) else raw
    if not isinstance(documents, list) or not documents:
        raise EndpointConfigError(
            f"{source}: expected a list of identity mapping documents (objects with a DATA_TYPE of "
            f"{EXPRESSION} or {EXTERNAL}); without one, no user can use this endpoint")
    rules: list[Rule] = []
    for index, document in enumerate(documents):
        where = f"{source}: document {index}"
        if not isinstance(document, dict):
            raise EndpointConfigError(f"{where}: expected an object, got {type(document).__name__}")
        data_type = document.get("DATA_TYPE")
        if data_type == EXPRESSION:
            rules.append(_expressions(document, where))
        elif data_type == EXTERNAL:
            rules.append(_external(document, where, endpoint_id))
        else:
            raise EndpointConfigError(
                f"{where}: DATA_TYPE must be {EXPRESSION!r} or {EXTERNAL!r}, got {data_type!r}")
    return rules


def _only_keys(document: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise EndpointConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (valid keys: {', '.join(sorted(allowed))})")


def _expressions(document: dict[str, Any], where: str) -> Rule:
    _only_keys(document, {"DATA_TYPE", "comment", "mappings"}, where)
    mappings = document.get("mappings")
    if not isinstance(mappings, list) or not mappings:
        raise EndpointConfigError(f"{where}: 'mappings' must be a non-empty list of "
                                  "{source, match, output} rules")
    for number, rule in enumerate(mappings):
        at = f"{where}, mappings[{number}]"
        if not isinstance(rule, dict):
            raise EndpointConfigError(f"{at}: expected an object with source, match and output")
        _only_keys(rule, {"source", "match", "output", "ignore_case", "literal", "comment"}, at)
        for key in ("source", "match", "output"):
            if not isinstance(rule.get(key), str):
                raise EndpointConfigError(f"{at}: '{key}' must be a string")
        for key in ("ignore_case", "literal"):
            if not isinstance(rule.get(key, False), bool):
                raise EndpointConfigError(f"{at}: '{key}' must be true or false")
    try:
        mapper = ExpressionIdentityMapping(mappings)
    except InvalidMappingError as e:
        raise EndpointConfigError(f"{where}: invalid match expression: {e.args[0]}") from None
    for number, compiled in enumerate(mapper.mappings):
        at = f"{where}, mappings[{number}]"
        groups = 0 if compiled.get("literal") else compiled["compiled_match"].groups
        for key, text in (("source", compiled["source"]), ("output", compiled["output"])):
            for name in _REFERENCE.findall(text):
                if name.isdigit() and key == "output":
                    if int(name) >= groups:
                        raise EndpointConfigError(
                            f"{at}: output refers to {{{name}}}, but the match has "
                            f"{groups} parenthesized group(s)" + (" (it is literal)" if groups == 0 else ""))
                elif name not in IDENTITY_FIELDS:
                    raise EndpointConfigError(
                        f"{at}: {key} refers to {{{name}}}; an identity here has only "
                        + ", ".join(f"{{{f}}}" for f in IDENTITY_FIELDS))

    def expressions(identity: dict[str, str]) -> str | None:
        try:
            return mapper.map_identity(identity)
        except LibraryMappingError as e:  # a reference the checks above should have refused
            log.warning("%s: %s", where, e)
            return None

    return expressions


def _external(document: dict[str, Any], where: str, endpoint_id: str) -> Rule:
    _only_keys(document, {"DATA_TYPE", "comment", "command", "timeout"}, where)
    command = document.get("command")
    if (not isinstance(command, list) or not command
            or not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in command)):
        raise EndpointConfigError(f"{where}: 'command' must be a non-empty list: the program, then "
                                  "its arguments")
    argv = [str(a) for a in command]
    if shutil.which(argv[0]) is None:
        raise EndpointConfigError(f"{where}: the program {argv[0]!r} is not an executable file "
                                  "(give its absolute path, and make it executable)")
    timeout = document.get("timeout", DEFAULT_TIMEOUT)
    if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TIMEOUT):
        raise EndpointConfigError(
            f"{where}: 'timeout' must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}, "
            f"got {timeout!r}")
    full = [*argv, "-c", POSIX_CONNECTOR_ID, "-s", endpoint_id or "farcall"]

    def program(identity: dict[str, str]) -> str | None:
        return run_mapping_program(full, identity, float(timeout))

    return program


def run_mapping_program(argv: Sequence[str], identity: dict[str, str], timeout: float) -> str | None:
    """The name an external mapping program prints for ``identity``; None for no mapping."""
    document = json.dumps({"DATA_TYPE": "identity_mapping_input#1.0.0", "identities": [identity]})
    env = {k: v for k, v in os.environ.items() if k != "FARCALL_TOKEN"}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    except OSError as e:
        log.error("identity mapping program %s could not start: %s", argv[0], e)
        return None
    try:
        stdout, stderr = proc.communicate(document, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: its children go too
        except ProcessLookupError:
            pass
        proc.communicate()
        log.warning("identity mapping program %s took more than %g s for %s: no mapping",
                    argv[0], timeout, identity.get("id"))
        return None
    if proc.returncode != 0:
        log.info("identity mapping program %s exited with %d for %s (no mapping): %s",
                 argv[0], proc.returncode, identity.get("id"), stderr.strip()[-500:])
        return None
    out = stdout.strip()
    if not out:
        return None
    if not out.startswith("{"):
        if "\n" in out:
            log.warning("identity mapping program %s printed several lines for %s; expected one "
                        "name or an identity_mapping_output#1.0.0 document: no mapping",
                        argv[0], identity.get("id"))
            return None
        return out
    try:
        parsed = json.loads(out)
        results = parsed["result"]
        for result in results:
            if str(result["id"]) == identity["id"]:
                return str(result["output"])
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("identity mapping program %s printed an invalid identity_mapping_output "
                    "document for %s (%s): no mapping", argv[0], identity.get("id"), e)
        return None


# ------------------------------------------------------------------ the mapper


def _identity(raw: dict[str, Any]) -> dict[str, str]:
    identity = {k: str(v) for k, v in raw.items() if isinstance(k, str) and v is not None}
    identity.setdefault("id", identity.get("sub", ""))
    identity.setdefault("sub", identity["id"])
    identity.setdefault("identity_id", identity["id"])
    identity.setdefault("username", "")
    identity.setdefault("status", "used")  # what the library's map_identities expects
    return identity


Signature = tuple[int, int, int]


class IdentityMapper:
    """``identity_mapping.json`` in force: it maps identities and follows the file's changes.

    The constructor raises ``EndpointConfigError`` if the file is missing or invalid; later an
    invalid or missing file keeps the mapping in force (logged once per change of the file).
    ``endpoint_id`` is what external programs get after ``-s``.
    """

    def __init__(self, path: Path, endpoint_id: str = "") -> None:
        self.path = Path(path)
        self.endpoint_id = endpoint_id
        self._lock = threading.Lock()
        signature = self._signature()
        if signature is None:
            raise EndpointConfigError(
                f"{self.path} does not exist: write the identity mapping there (farcall-endpoint "
                "configure NAME --multi-user writes an example), or set identity_mapping_config_path")
        self._rules = self._load()
        self._loaded: Signature | None = signature
        self._refused: Signature | None = None

    def _signature(self) -> Signature | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> list[Rule]:
        try:
            text = self.path.read_text()
        except OSError as e:
            raise EndpointConfigError(f"{self.path}: cannot be read: {e}") from None
        return parse_identity_mapping(text, str(self.path), self.endpoint_id)

    def _refresh(self) -> list[Rule]:
        with self._lock:
            signature = self._signature()
            if signature == self._loaded or signature == self._refused:
                return self._rules
            if signature is None:
                log.warning("%s is gone; the identity mapping read before stays in force",
                            self.path)
            else:
                try:
                    rules = self._load()
                except EndpointConfigError as e:
                    log.warning("the changed identity mapping is refused; the one read before "
                                "stays in force: %s", e)
                else:
                    self._rules, self._loaded = rules, signature
                    self._refused = None
                    log.info("identity mapping %s read again (%d document(s))", self.path, len(rules))
                    return rules
            self._refused = signature
            return self._rules

    def map_identity(self, identities: list[dict[str, Any]]) -> str | None:
        """The local name for the first identity a rule maps (rules in file order), or None.

        A name that cannot be an account name (empty, '/', spaces...) counts as no mapping.
        """
        rules = self._refresh()
        candidates = [_identity(i) for i in identities if isinstance(i, dict)]
        for rule in rules:
            for identity in candidates:
                name = rule(identity)
                if name is None or name == "":
                    continue
                if not LOCAL_NAME.match(name):
                    log.warning("identity %s mapped to %r, which is no valid account name: no "
                                "mapping", identity["id"], name)
                    continue
                return name
        return None
