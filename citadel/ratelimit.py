"""Rate limits (issue 4): placeholder interface used by the middleware."""

from __future__ import annotations

from typing import Protocol


class RateLimiter(Protocol):
    degraded: bool

    async def hit_auth_failure(self, address: str) -> None: ...

    async def hit_caller(self, caller: str, user: str | None) -> None: ...
