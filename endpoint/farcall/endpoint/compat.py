"""What each top-level key of a Globus Compute endpoint's ``config.yaml`` becomes in farcall.

One table, :data:`TOP_LEVEL_KEYS`, is the truth for both sides: the config reader acts on it
(:func:`take_globus_keys` records a warning for a key farcall takes but does not act on, and an
error for one it cannot take), and ``docs/migrating.md`` carries :func:`markdown_table` (a test
checks the page against it), so the docs cannot drift from the code.

The keys of a multi-user manager's configuration (``public``, ``identity_mapping_config_path``,
``pam``...) are the multi-user endpoint's, and the ``engine`` section's inner keys the engines';
neither is in this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from farcall.endpoint import problems

__all__ = ["TOP_LEVEL_KEYS", "GlobusKey", "markdown_table", "take_globus_keys"]

Fate = Literal["works", "warns", "refused"]


@dataclass(frozen=True)
class GlobusKey:
    """One top-level key of a Globus Compute ``config.yaml`` and what farcall does with it."""

    key: str
    fate: Fate
    """``works``: a farcall setting of the same name does what Globus Compute does (or the
    note says how it maps); ``warns``: accepted, not acted on, one WARNING saying what farcall
    does instead; ``refused``: an error saying what to write instead (it would change where
    tasks run)."""
    farcall: str
    """The farcall setting or feature that covers it (``-`` when nothing does)."""
    note: str
    """What farcall does; for ``warns`` and ``refused`` keys, the text of the warning or error."""


TOP_LEVEL_KEYS: tuple[GlobusKey, ...] = (
    GlobusKey("engine", "works", "`engine`",
              "what runs the tasks; its keys are described under \"The engine section\""),
    GlobusKey("display_name", "works", "`display_name`",
              "shown by `Client.get_endpoints()`; `None` (the text) means unset, as in Globus "
              "Compute"),
    GlobusKey("allowed_functions", "works", "`allowed_functions`",
              "a task for any other function fails with `FunctionNotAllowed` and never runs"),
    GlobusKey("heartbeat_period", "works", "`heartbeat_period`",
              "seconds between heartbeats; the broker shows the endpoint offline after three "
              "missed ones. No 5 s floor"),
    GlobusKey("heartbeat_threshold", "works", "`heartbeat_threshold`",
              "seconds without hearing from the broker before the agent deems the connection "
              "lost and reconnects (WebSocket pings every half of it). Unset: pings every 20 s, "
              "lost after 20 s more without an answer"),
    GlobusKey("idle_heartbeats_soft", "works", "`idle_heartbeats_soft`",
              "after at least one task, stop once this many heartbeat periods pass with no task "
              "running, no result unsent and nothing moving; 0: never. A stop as "
              "`farcall-endpoint stop` does (see also `idle_shutdown_seconds`)"),
    GlobusKey("idle_heartbeats_hard", "works", "`idle_heartbeats_hard`",
              "stop once this many heartbeat periods pass with no task or result moving at all, "
              "even with tasks outstanding (a lost worker); only when `idle_heartbeats_soft` > 0 "
              "(otherwise a warning says it has no effect); tasks still held go back to the "
              "broker, which hands them out again when the endpoint next connects"),
    GlobusKey("endpoint_setup", "works", "`endpoint_setup`",
              "shell commands run before the start; a failure stops the start"),
    GlobusKey("endpoint_teardown", "works", "`endpoint_teardown`",
              "shell commands run after the stop"),
    GlobusKey("debug", "works", "`debug`",
              "DEBUG logging, as `farcall-endpoint -v start`"),
    GlobusKey("log_dir", "works", "`log_dir`",
              "with `start --detach`: the directory of the endpoint's log (default: the "
              "endpoint's directory); relative to the endpoint's directory"),
    GlobusKey("stdout", "works", "`stdout`",
              "with `start --detach`: the file the daemon's output goes to (default "
              "`endpoint.log`), relative to `log_dir`"),
    GlobusKey("stderr", "works", "`stderr`",
              "with `start --detach`: the file the daemon's log goes to (default: the same as "
              "`stdout`), relative to `log_dir`"),
    GlobusKey("multi_user", "works", "`multi_user`",
              "removed from Globus Compute (a config without engine section is a manager there); "
              "see \"Multi-user and template-capable endpoints\" below"),
    GlobusKey("amqp_port", "warns", "`broker_url`",
              "ignored: farcall's endpoint speaks no AMQP; it holds one HTTPS/WSS connection to "
              "broker_url, on that URL's port"),
    GlobusKey("environment", "warns", "`broker_url`",
              "ignored: farcall has no named service environments; the endpoint connects to "
              "broker_url (or $FARCALL_BROKER_URL)"),
    GlobusKey("local_compute_services", "warns", "`broker_url`",
              "ignored: set broker_url to your own broker instead (for example "
              "http://127.0.0.1:8000 from `farcall-broker serve`)"),
    GlobusKey("authentication_policy", "warns", "`Client.share_endpoint`, `allowed_functions`",
              "ignored: farcall's broker has no Globus Auth policies; who may submit here is the "
              "endpoint's owner and the users it is shared with (Client.share_endpoint, "
              "`farcall endpoints share`), and allowed_functions limits what runs"),
    GlobusKey("subscription_id", "warns", "-",
              "ignored: farcall has no subscriptions; every feature (multi-user endpoints, "
              "sharing) works without one"),
    GlobusKey("admins", "warns", "`Client.share_endpoint`",
              "ignored: a farcall endpoint has one owner, the user whose token registered it, who "
              "alone may change, share or delete it; share it (Client.share_endpoint) to let "
              "others submit to it"),
    GlobusKey("high_assurance", "warns", "TLS, tokens, `audit_log_path`",
              "ignored: farcall has no high-assurance mode of its own; use TLS (an https:// "
              "broker_url; FARCALL_CA_BUNDLE for a private CA), tokens, one per machine "
              "(Client.create_token, revoke_token), `farcall-endpoint rotate-credential`, and a "
              "multi-user endpoint's audit_log_path for a record of who ran what"),
    GlobusKey("detach_endpoint", "warns", "`start --detach`",
              "ignored: `farcall-endpoint start NAME` runs in the foreground; run "
              "`farcall-endpoint start NAME --detach` for a daemon"),
    GlobusKey("executors", "refused", "`engine`",
              "the executors list of funcX-era configurations (gone from Globus Compute too) is "
              "not read: write one engine section instead, for example engine: {type: "
              "GlobusComputeEngine, provider: {type: LocalProvider}} (docs/endpoints.md, "
              "\"Engines\")"),
)

_BY_KEY = {k.key: k for k in TOP_LEVEL_KEYS}


def _asks_nothing(value: Any) -> bool:
    """``amqp_port: null``, ``high_assurance: false``, ``admins: []``: nothing for farcall to
    do or to warn about."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def take_globus_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without the Globus Compute keys farcall takes but does not act on.

    Each such key set to something (not null, false or empty) is recorded with
    :func:`~farcall.endpoint.problems.warn`, once; a refused key with
    :func:`~farcall.endpoint.problems.error` saying what to write instead.
    """
    kept: dict[str, Any] = {}
    for key, value in raw.items():
        known = _BY_KEY.get(key) if isinstance(key, str) else None
        if known is None or known.fate == "works":
            kept[key] = value
        elif known.fate == "refused":
            problems.error(key, f"{known.note} (got {_short(value)})")
        elif not _asks_nothing(value):
            problems.warn(key, f"{known.note} (got {_short(value)})")
    return kept


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def markdown_table() -> str:
    """The table of ``docs/migrating.md``: Globus Compute key | farcall | note."""
    fates = {"works": "", "warns": "accepted with a warning: ", "refused": "an error: "}
    rows = ["| Globus Compute key | farcall | note |", "|---|---|---|"]
    for k in TOP_LEVEL_KEYS:
        note = fates[k.fate] + k.note.removeprefix("ignored: ")
        note = note.replace("|", "\\|")
        rows.append(f"| `{k.key}` | {k.farcall} | {note} |")
    return "\n".join(rows) + "\n"
