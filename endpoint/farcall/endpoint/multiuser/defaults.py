"""The files ``farcall-endpoint configure NAME --multi-user`` writes, with commented defaults.

``config.yaml`` (the manager's: ``multi_user: true``, no engine) and, beside it, the four files
the administrator edits. Every file is checked before it is written, and the template renders
with no user values at all, so a fresh endpoint starts and serves users who send none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from farcall.endpoint.config import (
    CONFIG_FILE,
    IDENTITY_MAPPING,
    USER_CONFIG_SCHEMA,
    USER_CONFIG_TEMPLATE,
    USER_ENVIRONMENT,
)
from farcall.endpoint.errors import EndpointConfigError

__all__ = ["manager_config", "write_multi_user_files"]


def manager_config(name: str, broker_url: str | None) -> str:
    url_line = f"broker_url: {broker_url}" if broker_url else "# broker_url: https://broker.example.org"
    return f"""\
# farcall multi-user endpoint "{name}"
# Written by `farcall-endpoint configure {name} --multi-user`. Edit it and the files beside it
# (docs/multi-user.md), try the template with
#   farcall-endpoint render-user-config {name} --user-config '{{"max_workers": 2}}' --user SOMEONE
# then run `farcall-endpoint start {name}` as root (run by an ordinary account, it serves
# only its owner, as that account). Unknown keys are errors.

# Name shown to users in Client.get_endpoints().
display_name: {name}

# The broker to connect to. When absent: $FARCALL_BROKER_URL, then broker_url
# in $FARCALL_HOME/config. Every user endpoint connects to the same broker.
{url_line}

# Seconds between heartbeats; the broker marks the endpoint offline after
# three missed ones.
heartbeat_period: 10

# On stop: seconds to let the user endpoints' running tasks finish.
stop_timeout: 10

# This endpoint is a manager: it runs no task itself, so it has no engine section (as in
# Globus Compute, a config.yaml without one is a manager's even without this key).
# For each user who submits to it, it maps the user to a local account
# ({IDENTITY_MAPPING}), renders {USER_CONFIG_TEMPLATE} with the values
# the user sends (checked against {USER_CONFIG_SCHEMA}) and starts a user
# endpoint as that account, with the variables of {USER_ENVIRONMENT}.
multi_user: true

# Where the identity mapping is (default: {IDENTITY_MAPPING} beside this file).
# identity_mapping_config_path: /etc/farcall/{IDENTITY_MAPPING}

# One line per task state, with the local user and uid that ran it.
# audit_log_path: /var/log/farcall/{name}-audit.log

# Seconds a user endpoint with no work keeps running before it stops; the next
# task starts it again.
user_endpoint_idle_seconds: 300
"""


IDENTITY_MAPPING_TEXT = json.dumps([
    {
        "comment": (
            "Globus Compute's identity mapping formats. This rule runs each farcall user as the "
            "local account of the same name (a name that cannot be an account maps to no one; the "
            "manager never runs anyone as root or as itself). Rules may use {id}, {sub}, "
            "{identity_id} and {username}; 'match' must match the whole source. To strip a domain: "
            "source {username}, match (.*)@example\\.org, output {0}. To ask a program instead: "
            "{\"DATA_TYPE\": \"external_identity_mapping#1.0.0\", \"command\": "
            "[\"/usr/local/sbin/map-user\"], \"timeout\": 5}. See docs/multi-user.md."),
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [
            {"source": "{username}", "match": "(.*)", "output": "{0}"},
        ],
    },
], indent=2) + "\n"


def user_config_template(name: str) -> str:
    return """\
{#
  The config.yaml of each user endpoint, rendered for one user with the values they send
  (Executor(endpoint_id=..., user_endpoint_config={"max_workers": 4})), after the values pass
  user_config_schema.json. The rules (docs/multi-user.md):
  - Every {{ ... }} writes one complete YAML value: a string quoted and escaped, a number as
    a number. Inside a longer string, build the string in the expression:
        worker_init: {{ "module load " ~ module }}
    and quote values for a shell with shell_escape:
        worker_init: {{ "cd " ~ (local_home | shell_escape) }}
  - A variable that is not set is an error: give optional values a default, as below.
  - The manager sets local_user, local_uid, local_gid, local_home (the user's account) and
    parent_config (the manager's config.yaml); users cannot send values with these names.
  - Leave broker_url, multi_user, identity_mapping_config_path, audit_log_path,
    user_endpoint_idle_seconds and idle_shutdown_seconds out: the manager sets them.
  Try it: farcall-endpoint render-user-config @NAME@ --user-config '{"max_workers": 2}'
#}
display_name: {{ "@NAME@ (" ~ local_user ~ ")" }}

engine:
  # Worker processes on this host, running as the user's own account.
  type: ProcessPoolEngine
  max_workers: {{ max_workers | default(2) }}
  prefetch: 16
{#
  On a Slurm cluster, replace the engine section above with this one (the schema already
  takes account, partition and nodes):

engine:
  type: ParslEngine
  # This host's address on the compute network, which the workers connect back to.
  address: 127.0.0.1
  max_workers_per_node: {{ max_workers | default(2) }}
  provider:
    type: SlurmProvider
    account: {{ account }}
    partition: {{ partition | default("debug") }}
    nodes_per_block: {{ nodes | default(1) }}
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
    walltime: "01:00:00"
    worker_init: {{ "cd " ~ (local_home | shell_escape) }}
    launcher:
      type: SrunLauncher
#}
""".replace("@NAME@", name)


def user_config_schema(name: str) -> str:
    return json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"user_endpoint_config of the multi-user endpoint {name}",
        "type": "object",
        "properties": {
            "max_workers": {"type": "integer", "minimum": 1, "maximum": 16,
                            "description": "worker processes (per node on a cluster)"},
            "account": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$",
                        "description": "the allocation to charge (Slurm example)"},
            "partition": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$",
                          "description": "the partition to run in (Slurm example)"},
            "nodes": {"type": "integer", "minimum": 1, "maximum": 4,
                      "description": "nodes per block (Slurm example)"},
        },
        "additionalProperties": False,
    }, indent=2) + "\n"


USER_ENVIRONMENT_TEXT = """\
# Environment variables set in every user endpoint of this multi-user endpoint.
# The manager starts each user endpoint with a cleared environment, applies these,
# then sets HOME, USER and PATH itself. Values are strings or numbers.
# MODULEPATH: /opt/modules
# SCRATCH: /scratch
"""


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)  # also when the file was there with another mode
        f.write(text)


def write_multi_user_files(directory: Path, name: str, broker_url: str | None, force: bool) -> Path:
    """Write the manager's ``config.yaml`` and the four files beside it; return the config's path.

    Refuses to overwrite any of them without ``force``. The identity mapping and the environment
    are 0600 (they may say more about the site than users need to know), the rest 0644.
    """
    from farcall.endpoint.config import parse_config
    from farcall.endpoint.multiuser.identity import parse_identity_mapping

    files = {
        CONFIG_FILE: (manager_config(name, broker_url), 0o644),
        IDENTITY_MAPPING: (IDENTITY_MAPPING_TEXT, 0o600),
        USER_CONFIG_TEMPLATE: (user_config_template(name), 0o644),
        USER_CONFIG_SCHEMA: (user_config_schema(name), 0o644),
        USER_ENVIRONMENT: (USER_ENVIRONMENT_TEXT, 0o600),
    }
    existing = [n for n in files if (directory / n).exists()]
    if existing and not force:
        raise EndpointConfigError(
            f"endpoint {name!r} is already configured ({', '.join(existing)} in {directory}); edit "
            "those files, or pass --force to overwrite them")
    parse_config(files[CONFIG_FILE][0], str(directory / CONFIG_FILE))
    parse_identity_mapping(IDENTITY_MAPPING_TEXT, str(directory / IDENTITY_MAPPING))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for file_name, (text, mode) in files.items():
        _write(directory / file_name, text, mode)
    return directory / CONFIG_FILE
