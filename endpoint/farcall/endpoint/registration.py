"""Registering an endpoint with a broker, and keeping every registration's id and credential.

A broker deployment has an identity, its ``broker_id`` (the same on every replica), which it
says at registration, in the channel's ``Welcome`` and at ``GET /v1/health``. ``endpoint.json``
(mode 0600) keeps every registration the endpoint ever got, each with the broker id it belongs
to, and which one is in use. At start (``ensure_registered``):

- the same broker under another URL (``localhost`` for ``127.0.0.1``, a new DNS name) is the
  same endpoint: the stored URL is updated;
- a broker none of the registrations belongs to is refused (``RegistrationError``), unless the
  operator asks for a new registration (``farcall-endpoint start NAME --register-again``); the
  new one is added beside the others, so switching back reconnects as the first endpoint;
- a broker that cannot be reached starts with the registration stored for that very URL (the
  agent retries with backoff), and never registers anew.

A file from before brokers had ids (one registration, no ``broker_id``) still loads; its broker id
is learnt by asking the broker at its stored URL, or, when that does not answer, from the
``Welcome`` of the first session at the new URL (``confirm``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from farcall.backoff import Backoff
from farcall.endpoint.errors import EndpointRejected, RegistrationError
from farcall.errors import BrokerError
from farcall.protocol.rest import Health
from farcall.transport import Transport, TransportError

log = logging.getLogger(__name__)

CREDENTIALS_FILE = "endpoint.json"
IDENTITY_TIMEOUT = 5.0
"""Seconds one question to a broker about its identity may take."""
IDENTITY_WAIT = 30.0
"""Seconds a start waits for a broker that does not answer, when no registration is stored for
its URL (with one, the start goes ahead at once and the agent keeps trying)."""


@dataclass(frozen=True)
class Registration:
    """One endpoint registered with one broker: what the agent connects with."""

    endpoint_id: str
    credential: str
    name: str
    broker_url: str
    broker_id: str = ""
    """The broker deployment's identity; "" when not known yet (a file from before brokers
    had ids, or a broker too old to say)."""


@dataclass
class Registrations:
    """What ``endpoint.json`` holds: every registration, oldest first, and the one in use
    (what ``farcall-endpoint list`` and ``status`` show)."""

    registrations: list[Registration] = field(default_factory=list)
    endpoint_id: str = ""
    """The id of the registration in use."""

    def in_use(self) -> Registration | None:
        for r in self.registrations:
            if r.endpoint_id == self.endpoint_id:
                return r
        return self.registrations[-1] if self.registrations else None

    def for_broker(self, broker_id: str) -> Registration | None:
        """The newest registration with the broker ``broker_id``."""
        found = [r for r in self.registrations if broker_id and r.broker_id == broker_id]
        return found[-1] if found else None

    def for_url(self, url: str) -> Registration | None:
        """The newest registration stored with this URL (spelt the same)."""
        found = [r for r in self.registrations if same_url(r.broker_url, url)]
        return found[-1] if found else None

    def put(self, registration: Registration) -> None:
        """Record ``registration`` (replacing the one with its endpoint id, else added) and use it."""
        for i, r in enumerate(self.registrations):
            if r.endpoint_id == registration.endpoint_id:
                self.registrations[i] = registration
                break
        else:
            self.registrations.append(registration)
        self.endpoint_id = registration.endpoint_id


def same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


# ------------------------------------------------------------------ the file


def load_registrations(directory: Path) -> Registrations | None:
    """Every registration in ``endpoint.json`` (either format); ``None`` if there is no file."""
    path = directory / CREDENTIALS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if "registrations" not in raw:  # one registration, as files before broker ids were
            legacy = Registration(**raw)
            return Registrations([legacy], legacy.endpoint_id)
        found = Registrations([Registration(**r) for r in raw["registrations"]],
                              str(raw.get("endpoint_id") or ""))
    except (ValueError, TypeError, AttributeError) as e:
        raise RegistrationError(
            f"{path} is damaged ({e}); restore it from a backup, or delete it to register "
            "this endpoint again (it gets a new id)"
        ) from None
    if not found.registrations:
        return None
    return found


def load_registration(directory: Path) -> Registration | None:
    """The registration in use (the endpoint's id as ``list`` and ``status`` show it)."""
    stored = load_registrations(directory)
    return stored.in_use() if stored is not None else None


def stored_credential(directory: Path, endpoint_id: str) -> str | None:
    """The credential ``endpoint.json`` holds now for ``endpoint_id`` (None: none stored), for
    an agent whose credential was rotated while it ran."""
    stored = load_registrations(directory)
    for r in stored.registrations if stored is not None else []:
        if r.endpoint_id == endpoint_id:
            return r.credential
    return None


def save_registrations(directory: Path, registrations: Registrations) -> None:
    """Write ``endpoint.json`` readable by its owner only, atomically."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / CREDENTIALS_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"endpoint_id": registrations.endpoint_id,
                   "registrations": [asdict(r) for r in registrations.registrations]}, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def save_registration(directory: Path, registration: Registration) -> None:
    """Record ``registration`` in ``endpoint.json`` as the one in use, keeping every other."""
    stored = load_registrations(directory) or Registrations()
    stored.put(registration)
    save_registrations(directory, stored)


# ------------------------------------------------------------------ the broker


def register_endpoint(
    broker_url: str, token: str, name: str, description: str = "", timeout: float = 30
) -> Registration:
    """``POST /v1/endpoints`` with the user token; the broker shows the credential only once."""
    from farcall.client import Client

    try:
        with Client(broker_url=broker_url, token=token, timeout=timeout, retry_seconds=timeout) as c:
            data = c.register_endpoint(name, description)
    except BrokerError as e:
        if e.status == 0:
            raise RegistrationError(
                f"cannot reach the broker at {broker_url} to register endpoint {name!r}: {e}. "
                "Check broker_url and that the broker is running."
            ) from None
        hint = " Check FARCALL_TOKEN." if e.status in (401, 403) else ""
        raise RegistrationError(
            f"the broker refused to register endpoint {name!r} ({e.status}): {e}.{hint}"
        ) from None
    return Registration(data["endpoint_id"], data["credential"], name, broker_url,
                        str(data.get("broker_id") or ""))


class BrokerUnreachable(RegistrationError):
    """The broker did not answer the question of its identity in time."""


def broker_identity(broker_url: str, wait: float = 0.0, timeout: float = IDENTITY_TIMEOUT) -> str:
    """The ``broker_id`` the broker at ``broker_url`` says at ``GET /v1/health`` ("" from a
    broker too old to say). Asked again with backoff for up to ``wait`` seconds while it does not
    answer or does not know yet (its store is down); then ``BrokerUnreachable``."""
    http = Transport(broker_url.rstrip("/") + "/v1", {"Accept": "application/json"}, timeout)
    deadline = time.monotonic() + wait
    backoff = Backoff(cap=5.0)
    try:
        while True:
            try:
                answer = http.request("GET", "/health")
            except TransportError as e:
                why = str(e) or type(e).__name__
            else:
                if answer.status < 500 and answer.status != 200:
                    return ""  # a broker from before broker ids, or not a farcall broker
                try:
                    health = Health.model_validate_json(bytes(answer.body))
                except ValueError:
                    health = None
                if health is not None and (health.broker_id or answer.status == 200):
                    return health.broker_id  # a 503 still names it once the store answered
                if answer.status == 200:
                    return ""
                why = f"{answer.status} {answer.reason}"
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise BrokerUnreachable(f"the broker at {broker_url} does not answer ({why})")
            log.info("the broker at %s does not answer (%s); asking again in %.1f s",
                     broker_url, why, delay)
            time.sleep(delay)
    finally:
        http.close()


# ------------------------------------------------------------------ at start


def ensure_registered(
    directory: Path, broker_url: str, name: str, token: str | None = None,
    *, register_again: bool = False,
) -> Registration:
    """The registration to connect to the broker at ``broker_url`` with, recorded as the one in
    use: the stored one for that broker (whatever URL it was stored with), or, for a first start
    or with ``register_again``, a new one (needs ``token``, else the operator's). Raises
    ``RegistrationError`` for a broker none of the stored registrations belongs to."""
    url = broker_url.rstrip("/")
    stored = load_registrations(directory)
    if stored is None or register_again:
        return _register(directory, stored or Registrations(), url, name, token)
    at_url = stored.for_url(url)
    try:
        broker_id = broker_identity(url, wait=0.0 if at_url is not None else IDENTITY_WAIT)
    except BrokerUnreachable as e:
        if at_url is None:
            raise BrokerUnreachable(
                f"{e}, so it cannot be told whether it is a broker endpoint {directory.name!r} "
                f"is registered with ({_describe(stored)}). Start again once it answers."
            ) from None
        log.info("%s; starting as endpoint %s, registered there (the agent keeps trying)",
                 e, at_url.endpoint_id)
        return _use(directory, stored, at_url)
    _learn_ids(stored, url, broker_id)
    found = stored.for_broker(broker_id) if broker_id else at_url
    if found is not None:
        if not same_url(found.broker_url, url):
            log.info("the broker %s that endpoint %s is registered with is now at %s (was %s): "
                     "connecting as the same endpoint", broker_id, found.endpoint_id, url,
                     found.broker_url)
            found = replace(found, broker_url=url)
        return _use(directory, stored, found)
    unknown = [r for r in stored.registrations if not r.broker_id]
    if unknown and broker_id:
        # Its broker could not be asked: the credential itself is tried at this URL, and the
        # session's Welcome tells (``confirm``); a refusal says to register again (``refused``).
        log.info("endpoint %s was registered at %s, which does not answer; trying its "
                 "credential at %s", unknown[-1].endpoint_id, unknown[-1].broker_url, url)
        return replace(unknown[-1], broker_url=url)
    in_use = stored.in_use()
    assert in_use is not None
    raise RegistrationError(
        f"endpoint {directory.name!r} is registered with the broker at {in_use.broker_url} "
        f"({_broker(in_use.broker_id)}), but its configuration names {url}, a different broker "
        f"({_broker(broker_id)}). To register a new endpoint there, run: farcall-endpoint start "
        f"{directory.name} --register-again (the registration with {in_use.broker_url} is kept: "
        "setting broker_url back reconnects as endpoint "
        f"{in_use.endpoint_id}); or set broker_url back to {in_use.broker_url}."
    )


def confirm(directory: Path, registration: Registration, broker_id: str) -> Registration:
    """Record what a session's ``Welcome`` proved: the broker at ``registration.broker_url``
    took this credential, so it is the broker ``broker_id`` this registration belongs to."""
    if not broker_id or registration.broker_id == broker_id:
        return registration
    stored = load_registrations(directory) or Registrations()
    old = next((r for r in stored.registrations if r.endpoint_id == registration.endpoint_id), None)
    confirmed = replace(registration, broker_id=broker_id)
    stored.put(confirmed)
    save_registrations(directory, stored)
    if old is not None and not same_url(old.broker_url, confirmed.broker_url):
        log.info("the broker at %s took endpoint %s's credential: it is the broker %s the "
                 "endpoint was registered with at %s", confirmed.broker_url,
                 confirmed.endpoint_id, broker_id, old.broker_url)
    return confirmed


def refused(directory: Path, registration: Registration, error: EndpointRejected) -> Exception:
    """The error to stop with when the broker refused ``registration``'s credential: for a
    credential tried at a new URL without knowing its broker, most likely a different broker."""
    if registration.broker_id:
        return error
    stored = load_registrations(directory)
    before = next((r for r in stored.registrations if r.endpoint_id == registration.endpoint_id),
                  None) if stored is not None else None
    was = before.broker_url if before is not None else "another URL"
    return RegistrationError(
        f"the broker at {registration.broker_url} refused endpoint {registration.endpoint_id} "
        f"(registered at {was}, which did not answer): it is most likely a different broker. "
        f"To register a new endpoint there, run: farcall-endpoint start {directory.name} "
        f"--register-again (the registration with {was} is kept); or set broker_url back to "
        f"{was}. ({error})"
    )


def _learn_ids(stored: Registrations, url: str, broker_id: str) -> None:
    """Fill in the broker id of registrations stored without one: the broker that answered at
    their very URL is theirs; another URL's broker is asked (if it does not answer, it stays
    unknown). Saved with the next write."""
    for i, r in enumerate(stored.registrations):
        if r.broker_id:
            continue
        if same_url(r.broker_url, url):
            learnt = broker_id
        else:
            try:
                learnt = broker_identity(r.broker_url)
            except BrokerUnreachable as e:
                log.info("cannot learn which broker endpoint %s belongs to: %s", r.endpoint_id, e)
                continue
        if learnt:
            stored.registrations[i] = replace(r, broker_id=learnt)


def _use(directory: Path, stored: Registrations, registration: Registration) -> Registration:
    stored.put(registration)
    save_registrations(directory, stored)
    return registration


def _register(directory: Path, stored: Registrations, url: str, name: str,
              token: str | None) -> Registration:
    if token is None:
        from farcall.endpoint.config import operator_token

        token = operator_token()
    registration = register_endpoint(url, token, name)
    if not registration.broker_id:  # a broker that does not say it at registration
        try:
            registration = replace(registration, broker_id=broker_identity(url))
        except BrokerUnreachable:
            pass  # learnt from the first Welcome
    _use(directory, stored, registration)
    log.info("registered endpoint %s as %s with the broker at %s (%s)", name,
             registration.endpoint_id, url, _broker(registration.broker_id))
    return registration


def _broker(broker_id: str) -> str:
    return f"broker id {broker_id}" if broker_id else "broker id unknown"


def _describe(stored: Registrations) -> str:
    return "; ".join(f"endpoint {r.endpoint_id} at {r.broker_url}, {_broker(r.broker_id)}"
                     for r in stored.registrations)
