"""In-process ``UserStore``: users, their unique names, and every token's principal."""

from __future__ import annotations

from farcall.broker.records import TokenRecord, UserRecord
from farcall.broker.store.base import Principal, UserStore
from farcall.broker.store.memory.state import State


class MemoryUsers(UserStore):
    def __init__(self, state: State) -> None:
        self._s = state

    async def create(self, user: UserRecord, token: TokenRecord) -> bool:
        if user.name in self._s.names:
            return False
        self._s.names[user.name] = user.user_id
        self._s.users[user.user_id] = user.model_copy()
        await self.add_token(token)
        return True

    async def get(self, user_id: str) -> UserRecord | None:
        user = self._s.users.get(user_id)
        return None if user is None else user.model_copy()

    async def get_many(self, user_ids: list[str]) -> dict[str, UserRecord]:
        users = self._s.users
        return {u: users[u].model_copy() for u in user_ids if u in users}

    async def by_name(self, name: str) -> UserRecord | None:
        user_id = self._s.names.get(name)
        return None if user_id is None else await self.get(user_id)

    async def all(self) -> list[UserRecord]:
        return sorted((u.model_copy() for u in self._s.users.values()), key=lambda u: u.name)

    async def add_token(self, token: TokenRecord, max_tokens: int = 0) -> bool:
        if max_tokens and await self.token_count(token.user_id) >= max_tokens:
            return False
        self._s.user_tokens[token.token_id] = token.model_copy()
        self._s.tokens[token.token_hash] = Principal(
            "user", token.user_id, token.token_hash, token.token_id)
        return True

    async def token_count(self, user_id: str) -> int:
        return sum(1 for t in self._s.user_tokens.values() if t.user_id == user_id)

    async def set_disabled(self, user_id: str, disabled: bool) -> bool:
        user = self._s.users.get(user_id)
        if user is None:
            return False
        user.disabled = disabled
        return True

    async def list_tokens(self, user_id: str | None = None) -> list[TokenRecord]:
        found = [t.model_copy() for t in self._s.user_tokens.values()
                 if user_id is None or t.user_id == user_id]
        return sorted(found, key=lambda t: (t.created_at, t.token_id))

    async def revoke_token(self, token_id: str, user_id: str | None = None) -> TokenRecord | None:
        token = self._s.user_tokens.get(token_id)
        if token is None or (user_id is not None and token.user_id != user_id):
            return None
        del self._s.user_tokens[token_id]
        self._s.tokens.pop(token.token_hash, None)
        return token

    async def resolve_token(self, token_hash: str) -> Principal | None:
        found = self._s.tokens.get(token_hash)
        if found is None:
            return None
        owner = found.id if found.kind == "user" else (
            ep.user_id if (ep := self._s.endpoints.get(found.id)) else "")
        user = self._s.users.get(owner)
        return None if user is not None and user.disabled else found
