"""In-process ``FunctionStore``: functions by id, with whom each is shared."""

from __future__ import annotations

from farcall.broker.records import FunctionRecord
from farcall.broker.store.base import FunctionStore
from farcall.broker.store.memory.state import State, shared_with


class MemoryFunctions(FunctionStore):
    def __init__(self, state: State) -> None:
        self._s = state

    async def put(self, function: FunctionRecord) -> None:
        self._s.functions[function.function_id] = function.model_copy(
            update={"shared_with": sorted(set(function.shared_with))})

    async def get_many(self, function_ids: list[str]) -> dict[str, FunctionRecord]:
        found = self._s.functions
        return {f: found[f].model_copy(deep=True) for f in function_ids if f in found}

    async def delete(self, function_id: str) -> None:
        self._s.functions.pop(function_id, None)

    async def count(self, user_id: str) -> int:
        return sum(1 for f in self._s.functions.values() if f.user_id == user_id)

    async def share(
        self, function_id: str, user_id: str | None, public: bool | None, shared: bool
    ) -> None:
        fn = self._s.functions.get(function_id)
        if fn is None:
            return
        if user_id is not None:
            fn.shared_with = shared_with(fn.shared_with, user_id, shared)
        if public:
            fn.public = shared
