"""Globus Compute's serialization strategy names, importable from ``farcall.serialize``, each
standing for the farcall function strategy that does its job."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from farcall import compat
from farcall import serialize as fs
from farcall.errors import CompatibilityWarning
from farcall.strategies import NAMES, code_strategy_of


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    compat.reset()
    yield
    compat.reset()


def add_one(x: int) -> int:
    return x + 1


def test_every_globus_compute_name_is_importable_from_farcall_serialize() -> None:
    for name in NAMES:
        assert getattr(fs, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'NoSuchStrategy'"):
        fs.NoSuchStrategy  # noqa: B018


@pytest.mark.parametrize(("strategy", "farcall"), [
    ("DillCode", "dill"), ("DillCodeSource", "source"), ("DillCodeTextInspect", "source"),
    ("PureSourceTextInspect", "source"), ("PureSourceDill", "source"),
    ("CombinedCode", "auto"), ("AllCodeStrategies", "auto"),
])
def test_each_code_strategy_names_a_farcall_one(strategy: str, farcall: str) -> None:
    cls = getattr(fs, strategy)
    assert code_strategy_of(cls()) == farcall == code_strategy_of(cls)
    assert fs.ComputeSerializer(strategy_code=cls()).code_strategy == farcall


def test_a_data_strategy_is_accepted_with_one_warning_and_not_as_code() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs.ComputeSerializer(strategy_data=fs.JSONData())
        fs.ComputeSerializer(strategy_data=fs.DillDataBase64())
    assert [str(w.message) for w in caught if w.category is CompatibilityWarning] == [
        f"ComputeSerializer(strategy_data=...) is accepted and not used: {compat.DATA}"]
    with pytest.raises(TypeError, match="strategy_code must be one of CombinedCode"):
        fs.ComputeSerializer(strategy_code=fs.JSONData())
    with pytest.raises(TypeError, match="strategy_data must be a data strategy"):
        fs.ComputeSerializer(strategy_data=fs.DillCode())


def test_the_serializer_round_trips_with_its_code_strategy() -> None:
    serializer = fs.ComputeSerializer(strategy_code=fs.PureSourceTextInspect())
    payload = serializer.serialize(add_one)
    assert fs.payload_strategy(payload) == fs.FUNCTION_SOURCE
    assert serializer.deserialize(payload)(1) == 2
    assert serializer.deserialize(serializer.serialize({"a": [1, 2]})) == {"a": [1, 2]}
