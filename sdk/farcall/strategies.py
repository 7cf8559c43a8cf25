"""Globus Compute's serialization strategy names, mapped onto farcall's function strategies.

A Globus Compute program chooses how its function code travels with
``ComputeSerializer(strategy_code=DillCode())`` and hands that to the ``Executor`` (``serializer=``)
or the ``Client`` (``code_serialization_strategy=``). farcall has three function strategies
(``farcall.serialize.STRATEGIES``) and tries them in turn by default; each Globus Compute code
strategy here names the one that does the same job, so the program's choice is honoured. Data
strategies are accepted and not used: farcall picks per object (see :data:`farcall.compat.DATA`).
These names are importable from ``farcall.serialize``, where a program's changed import looks.
"""

from __future__ import annotations

from typing import Any

from farcall import compat


class SerializationStrategy:
    """Base of the strategy names; ``code_strategy`` is the farcall function strategy it stands
    for (``"auto"``, ``"cloudpickle"``, ``"dill"`` or ``"source"``), None for a data strategy."""

    code_strategy: str | None = None
    for_code = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class DillCode(SerializationStrategy):
    """The function by value with dill."""

    code_strategy = "dill"


class DillCodeSource(SerializationStrategy):
    """The function's source text (found by dill), run again on the worker."""

    code_strategy = "source"


class DillCodeTextInspect(SerializationStrategy):
    """The function's source text (found by ``inspect``), run again on the worker."""

    code_strategy = "source"


class PureSourceTextInspect(SerializationStrategy):
    """The function's source text only: the worker needs no matching dill."""

    code_strategy = "source"


class PureSourceDill(SerializationStrategy):
    """The function's source text only (found by dill)."""

    code_strategy = "source"


class CombinedCode(SerializationStrategy):
    """Every way at once; farcall's ``"auto"``: cloudpickle, then dill, then source."""

    code_strategy = "auto"


class AllCodeStrategies(SerializationStrategy):
    """The first strategy that works; farcall's ``"auto"``."""

    code_strategy = "auto"


class DillDataBase64(SerializationStrategy):
    """Arguments with dill: farcall picks per object (accepted, not used)."""

    for_code = False


class JSONData(SerializationStrategy):
    """Arguments as JSON: farcall picks per object (accepted, not used)."""

    for_code = False


class AllDataStrategies(SerializationStrategy):
    """The first data strategy that works: what farcall does by itself."""

    for_code = False


DEFAULT_STRATEGY_CODE = CombinedCode()
DEFAULT_STRATEGY_DATA = AllDataStrategies()


class ComputeSerializer:
    """A code strategy and a data strategy, as Globus Compute's ``ComputeSerializer`` holds them.

    ``code_strategy`` is the farcall function strategy the Executor or Client then uses. A data
    strategy is accepted with a :class:`~farcall.errors.CompatibilityWarning`; so is
    ``allowed_deserializer_types`` (farcall loads what its own strategies wrote).
    """

    def __init__(self, strategy_code: SerializationStrategy | None = None,
                 strategy_data: SerializationStrategy | None = None, *,
                 allowed_deserializer_types: Any = None) -> None:
        self.strategy_code = strategy_code or DEFAULT_STRATEGY_CODE
        self.strategy_data = strategy_data or DEFAULT_STRATEGY_DATA
        self.code_strategy = code_strategy_of(self.strategy_code, "strategy_code")
        if not isinstance(self.strategy_data, SerializationStrategy) or self.strategy_data.for_code:
            raise TypeError(f"strategy_data must be a data strategy (DillDataBase64(), JSONData(),"
                            f" AllDataStrategies()), got {self.strategy_data!r}")
        if strategy_data is not None:
            compat.warn_once("ComputeSerializer(strategy_data=)", (
                f"ComputeSerializer(strategy_data=...) is accepted and not used: {compat.DATA}"))
        if allowed_deserializer_types is not None:
            compat.warn_once("ComputeSerializer(allowed_deserializer_types=)", (
                "ComputeSerializer(allowed_deserializer_types=...) is accepted and not used: "
                "farcall loads only payloads its own strategies wrote"))

    def serialize(self, data: Any) -> str:
        """``data`` as a farcall payload (a function with the code strategy)."""
        from farcall.serialize import serialize, serialize_function

        if callable(data) and not isinstance(data, type):
            return serialize_function(data, self.code_strategy)
        return serialize(data)

    def deserialize(self, payload: str) -> Any:
        """What :meth:`serialize` made, loaded."""
        from farcall.serialize import (
            STRATEGIES,
            deserialize,
            deserialize_function,
            payload_strategy,
        )

        if payload_strategy(payload) in STRATEGIES.values():
            return deserialize_function(payload)
        return deserialize(payload)

    def __repr__(self) -> str:
        return (f"ComputeSerializer(strategy_code={self.strategy_code!r}, "
                f"strategy_data={self.strategy_data!r})")


def code_strategy_of(strategy: Any, what: str = "the code strategy") -> str:
    """The farcall function strategy a Globus Compute code strategy (instance or class) stands
    for; ``TypeError`` naming the ones there are otherwise."""
    if isinstance(strategy, type) and issubclass(strategy, SerializationStrategy):
        strategy = strategy()
    if isinstance(strategy, SerializationStrategy) and strategy.code_strategy is not None:
        return strategy.code_strategy
    names = ", ".join(c.__name__ + "()" for c in _CODE)
    raise TypeError(f"{what} must be one of {names} (from farcall.serialize), got {strategy!r}")


def check_serializer(serializer: Any) -> ComputeSerializer:
    """``serializer`` if it is a :class:`ComputeSerializer`; ``TypeError`` saying what to pass."""
    if not isinstance(serializer, ComputeSerializer):
        raise TypeError("serializer must be a ComputeSerializer (from farcall.serialize import "
                        f"ComputeSerializer), got {type(serializer).__name__}")
    return serializer


_CODE = (CombinedCode, AllCodeStrategies, DillCode, DillCodeSource, DillCodeTextInspect,
         PureSourceTextInspect, PureSourceDill)

NAMES = ("ComputeSerializer", "SerializationStrategy", "DEFAULT_STRATEGY_CODE",
         "DEFAULT_STRATEGY_DATA", "AllCodeStrategies", "AllDataStrategies", "CombinedCode",
         "DillCode", "DillCodeSource", "DillCodeTextInspect", "PureSourceDill",
         "PureSourceTextInspect", "DillDataBase64", "JSONData")
"""What ``farcall.serialize`` lends from here (Globus Compute's ``serialize`` names)."""
