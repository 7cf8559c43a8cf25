"""What every conversation shares: version warnings, resource-specification limits, the base model."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from farcall.protocol.common import (
    MAX_SPEC_BYTES,
    MAX_SPEC_DEPTH,
    TaskState,
    Versions,
    check_resource_specification,
    version_mismatch,
    versions_text,
)
from farcall.protocol.rest import TaskSpec

MINE = Versions(python="3.11.7", dill="0.4.1", cloudpickle="3.1.1", farcall="0.1.0")


def _nested(levels: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"num_nodes": 1}
    for _ in range(levels - 1):
        spec = {"inner": spec}
    return spec


def test_a_cloudpickle_version_mismatch_is_named() -> None:
    assert version_mismatch(MINE, MINE.model_copy()) == ""
    other = MINE.model_copy(update={"cloudpickle": "3.0.0"})
    warning = version_mismatch(MINE, other)
    assert "cloudpickle 3.1.1" in warning and "cloudpickle 3.0.0" in warning
    assert "same Python, dill and cloudpickle versions" in warning
    older = Versions(python="3.11.7", dill="0.4.1")  # a farcall that did not report cloudpickle
    assert version_mismatch(MINE, older) == ""
    assert "worker: Python 3.11.7, dill 0.4.1, cloudpickle ?" in versions_text(MINE, older)


def test_python_versions_are_compared_by_major_and_minor() -> None:
    assert version_mismatch(MINE, MINE.model_copy(update={"python": "3.11.9"})) == ""
    warning = version_mismatch(MINE, MINE.model_copy(update={"python": "3.12.3"}))
    assert "submitter: Python 3.11.7" in warning and "worker: Python 3.12.3" in warning
    assert version_mismatch(MINE, MINE.model_copy(update={"dill": "0.3.9"})) != ""


def test_an_unknown_side_gives_no_warning_and_dicts_are_read_as_versions() -> None:
    assert version_mismatch(None, MINE) == version_mismatch(MINE, None) == ""
    assert version_mismatch(MINE.model_dump(), {**MINE.model_dump(), "dill": "0.3.9"}) != ""
    assert versions_text(None, MINE) == f"submitter: unknown versions; worker: {MINE.describe()}"


def test_a_resource_specification_within_the_limits_is_kept() -> None:
    assert check_resource_specification(None) is None
    spec = _nested(MAX_SPEC_DEPTH)
    assert check_resource_specification(spec) is spec


def test_a_resource_specification_nested_too_deep_is_refused() -> None:
    with pytest.raises(ValueError, match=rf"nested deeper than {MAX_SPEC_DEPTH} levels; flatten it"):
        check_resource_specification(_nested(MAX_SPEC_DEPTH + 1))
    with pytest.raises(ValueError, match="nested deeper"):
        check_resource_specification({"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]})  # lists count too


def test_a_resource_specification_too_big_is_refused() -> None:
    with pytest.raises(ValueError, match=rf"over the limit of {MAX_SPEC_BYTES}; pass data as arguments"):
        check_resource_specification({"notes": "x" * MAX_SPEC_BYTES})


def test_the_limits_hold_in_every_model_that_carries_a_specification() -> None:
    with pytest.raises(ValidationError, match="nested deeper"):
        TaskSpec(function_id="f", args="11\n", resource_specification=_nested(MAX_SPEC_DEPTH + 1))


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    v = Versions.model_validate({**MINE.model_dump(), "numpy": "2.0.0"})
    assert v == MINE


def test_terminal_states_are_the_final_three() -> None:
    assert {s for s in TaskState if s.terminal} == {TaskState.SUCCESS, TaskState.FAILED, TaskState.CANCELLED}
