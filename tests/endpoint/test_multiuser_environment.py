"""user_environment.yaml: names to strings or numbers, anything else refused naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.multiuser.environment import load_user_environment


def test_no_file_or_only_comments_is_no_variables(tmp_path: Path) -> None:
    assert load_user_environment(tmp_path) == {}
    (tmp_path / "user_environment.yaml").write_text("# MODULEPATH: /opt/modules\n")
    assert load_user_environment(tmp_path) == {}


def test_strings_and_numbers_become_strings(tmp_path: Path) -> None:
    (tmp_path / "user_environment.yaml").write_text(
        "MODULEPATH: /opt/modules\nOMP_NUM_THREADS: 4\nRATIO: 0.5\nGREETING: 'a: b'\n")
    assert load_user_environment(tmp_path) == {
        "MODULEPATH": "/opt/modules", "OMP_NUM_THREADS": "4", "RATIO": "0.5", "GREETING": "a: b"}


@pytest.mark.parametrize(("text", "says"), [
    ("- A\n- B\n", "expected a mapping"),
    ("A: [1, 2]\n", "A: expected a string or a number, got list"),
    ("A:\n  B: c\n", "A: expected a string or a number, got dict"),
    ("DEBUG: true\n", "DEBUG: expected a string or a number, got bool (quote it"),
    ("EMPTY:\n", "EMPTY: expected a string or a number, got null"),
    ("1BAD: x\n", "'1BAD' is not a valid environment variable name"),
    ("A-B: x\n", "'A-B' is not a valid environment variable name"),
    ("A: \"x\\0y\"\n", "A: a value may not contain a NUL"),
    ("A: [\n", "not valid YAML"),
])
def test_anything_else_is_refused_naming_the_file_and_key(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "user_environment.yaml"
    path.write_text(text)
    with pytest.raises(EndpointConfigError) as e:
        load_user_environment(tmp_path)
    assert str(path) in str(e.value) and says in str(e.value)
