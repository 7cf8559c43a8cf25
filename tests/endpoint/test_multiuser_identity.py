"""identity_mapping.json: Globus Compute's expression and external-program mappings, re-read on change."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.multiuser.identity import (
    POSIX_CONNECTOR_ID,
    IdentityMapper,
    NoLocalAccount,
    local_user,
    parse_identity_mapping,
)
from harness.procs import wait_until

ALICE = {"id": "7b1c4bb6-0e2c-4c1a-9d0b-1f6f0e3c2a11", "sub": "7b1c4bb6-0e2c-4c1a-9d0b-1f6f0e3c2a11",
         "username": "alice@example.org"}
BOB = {"id": "0d6a3f7e-5b1e-4c55-8a8f-2f1f6b2f9c22", "sub": "0d6a3f7e-5b1e-4c55-8a8f-2f1f6b2f9c22",
       "username": "bob"}


def expressions(*rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": list(rules)}]


def mapper(tmp_path: Path, documents: Any, name: str = "identity_mapping.json") -> IdentityMapper:
    path = tmp_path / name
    path.write_text(json.dumps(documents))
    return IdentityMapper(path, endpoint_id="ep-1")


# ------------------------------------------------------------------ expressions


def test_the_default_rule_maps_a_username_to_the_same_local_name(tmp_path: Path) -> None:
    m = mapper(tmp_path, expressions({"source": "{username}", "match": "(.*)", "output": "{0}"}))
    assert m.map_identity([BOB]) == "bob"


def test_a_domain_is_stripped_and_other_domains_do_not_map(tmp_path: Path) -> None:
    m = mapper(tmp_path, expressions(
        {"source": "{username}", "match": "(.*)@example\\.org", "output": "{0}"}))
    assert m.map_identity([ALICE]) == "alice"
    assert m.map_identity([BOB]) is None
    assert m.map_identity([{**ALICE, "username": "alice@example.org.evil"}]) is None  # anchored


def test_rules_apply_in_order_over_every_identity(tmp_path: Path) -> None:
    m = mapper(tmp_path, [
        *expressions({"source": "{id}", "match": BOB["id"], "output": "service", "literal": True}),
        *expressions({"source": "{username}", "match": "(.*)@EXAMPLE\\.org", "output": "{0}",
                      "ignore_case": True}),
    ])
    assert m.map_identity([ALICE, BOB]) == "service"  # the first document wins, whichever identity
    assert m.map_identity([ALICE]) == "alice"
    assert m.map_identity([]) is None


def test_identity_id_is_the_id(tmp_path: Path) -> None:
    m = mapper(tmp_path, expressions({"source": "{identity_id}", "match": ALICE["id"], "output": "alice"}))
    assert m.map_identity([ALICE]) == "alice"


@pytest.mark.parametrize("output", ["a/b", "two words", "-rf"])
def test_a_name_that_cannot_be_an_account_maps_to_no_one(tmp_path: Path, output: str) -> None:
    m = mapper(tmp_path, expressions({"source": "{username}", "match": "bob", "output": output}))
    assert m.map_identity([BOB]) is None


@pytest.mark.parametrize(("documents", "says"), [
    ("not json", "not valid JSON"),
    ([], "expected a list"),
    ([{"DATA_TYPE": "nonsense#1.0.0"}], "DATA_TYPE must be"),
    (expressions({"source": "{username}", "match": "(.*)", "output": "{0}", "regex": True}),
     "unknown key(s) regex"),
    (expressions({"source": "{username}", "match": "*x", "output": "{0}"}), "leading wildcard"),
    (expressions({"source": "{email}", "match": "(.*)", "output": "{0}"}), "refers to {email}"),
    (expressions({"source": "{username}", "match": "(.*)", "output": "{1}"}), "1 parenthesized group"),
    (expressions({"source": "{username}", "match": "(.*)", "output": "{0}", "literal": True}),
     "it is literal"),
    (expressions({"source": "{username}", "match": "(.*)"}), "'output' must be a string"),
    ([{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["/no/such/program"]}],
     "not an executable file"),
    ([{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [sys.executable], "timeout": 0}],
     "'timeout' must be"),
])
def test_an_invalid_file_is_refused_naming_the_file_and_the_fault(
        tmp_path: Path, documents: Any, says: str) -> None:
    path = tmp_path / "identity_mapping.json"
    path.write_text(documents if isinstance(documents, str) else json.dumps(documents))
    with pytest.raises(EndpointConfigError) as e:
        IdentityMapper(path)
    assert str(path) in str(e.value) and says in str(e.value)


def test_a_missing_file_says_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(EndpointConfigError, match="identity_mapping.json does not exist"):
        IdentityMapper(tmp_path / "identity_mapping.json")


# ------------------------------------------------------------------ re-reading


def test_a_changed_file_takes_effect_and_an_invalid_one_keeps_the_old(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "identity_mapping.json"
    path.write_text(json.dumps(expressions({"source": "{username}", "match": "bob", "output": "bob1"})))
    m = IdentityMapper(path)
    assert m.map_identity([BOB]) == "bob1"

    # same size, new inode (as editors and `mv` do): still noticed
    replacement = tmp_path / "new.json"
    replacement.write_text(json.dumps(expressions({"source": "{username}", "match": "bob", "output": "bob2"})))
    os.replace(replacement, path)
    assert m.map_identity([BOB]) == "bob2"

    caplog.set_level(logging.WARNING, "farcall.endpoint.multiuser.identity")
    path.write_text("[{\"DATA_TYPE\": \"expression_identity_mapping#1.0.0\", \"mappings\": [")
    assert m.map_identity([BOB]) == "bob2"
    assert m.map_identity([BOB]) == "bob2"
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, "logged once per change, not once per look-up"
    assert "not valid JSON" in refusals[0].getMessage()

    path.write_text(json.dumps(expressions({"source": "{username}", "match": "bob", "output": "robert"})))
    assert m.map_identity([BOB]) == "robert"

    path.unlink()
    assert m.map_identity([BOB]) == "robert"


# ------------------------------------------------------------------ external programs


def program(tmp_path: Path, body: str) -> Path:
    """An executable Python script; it gets argv and the input document as ``args`` and ``doc``."""
    path = tmp_path / "map-user"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\nargs = sys.argv[1:]\n"
                    f"doc = json.load(sys.stdin)\n{body}\n")
    path.chmod(0o755)
    return path


def external(path: Path, *args: str, timeout: float | None = None) -> list[dict[str, Any]]:
    document: dict[str, Any] = {"DATA_TYPE": "external_identity_mapping#1.0.0",
                                "command": [str(path), *args]}
    if timeout is not None:
        document["timeout"] = timeout
    return [document]


def test_an_external_program_gets_the_identity_and_globus_arguments(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    script = program(tmp_path, f"json.dump({{'args': args, 'doc': doc}}, open({str(seen)!r}, 'w'))\n"
                               "print(doc['identities'][0]['username'].split('@')[0])")
    m = mapper(tmp_path, external(script, "--site", "x"))
    assert m.map_identity([ALICE]) == "alice"
    got = json.loads(seen.read_text())
    assert got["args"] == ["--site", "x", "-c", POSIX_CONNECTOR_ID, "-s", "ep-1"]
    assert got["doc"]["DATA_TYPE"] == "identity_mapping_input#1.0.0"
    identity = got["doc"]["identities"][0]
    assert (identity["id"], identity["username"]) == (ALICE["id"], ALICE["username"])


def test_an_external_program_may_answer_with_globus_output_document(tmp_path: Path) -> None:
    script = program(tmp_path, "i = doc['identities'][0]\nprint(json.dumps({'DATA_TYPE': "
                               "'identity_mapping_output#1.0.0', 'result': [{'id': i['id'], "
                               "'output': 'mapped-' + i['username']}] if i['username'] == 'bob' else []}))")
    m = mapper(tmp_path, external(script))
    assert m.map_identity([BOB]) == "mapped-bob"
    assert m.map_identity([ALICE]) is None


@pytest.mark.parametrize("body", ["print('bob'); sys.exit(1)", "pass", "print('bob\\nroot')",
                                  "print('{not json')"])
def test_a_failing_silent_or_garbled_program_means_no_mapping(tmp_path: Path, body: str) -> None:
    m = mapper(tmp_path, external(program(tmp_path, body)))
    assert m.map_identity([BOB]) is None


def test_a_program_that_overruns_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = program(tmp_path, "import subprocess\nchild = subprocess.Popen(['sleep', '300'])\n"
                               f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
                               "time.sleep(300)\nprint('bob')")
    m = mapper(tmp_path, external(script, timeout=1))
    assert m.map_identity([BOB]) is None
    for pid in map(int, pids.read_text().split()):
        def gone(pid: int = pid) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        wait_until(gone, 10, f"process {pid} of the mapping program is killed")


def test_parse_names_the_source_it_is_given() -> None:
    with pytest.raises(EndpointConfigError, match="^site/identity_mapping.json: document 0: "):
        parse_identity_mapping(json.dumps([{"DATA_TYPE": "x"}]), "site/identity_mapping.json")


# ------------------------------------------------------------------ the account


def test_local_user_reads_the_password_database() -> None:
    user = local_user("root")
    assert (user.uid, user.gid, user.home) == (0, 0, "/root")


def test_no_local_account_names_it_and_says_what_to_do() -> None:
    with pytest.raises(NoLocalAccount) as e:
        local_user("no-such-account-here")
    assert isinstance(e.value, LookupError)
    assert "'no-such-account-here'" in str(e.value) and "useradd" in str(e.value)
