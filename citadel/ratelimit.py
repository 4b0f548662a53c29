"""Rate limits on the ``limits`` library's async API, shared through Redis when configured.

Three budgets, as the contract names them: per authenticated caller (all
operations together; ``CITADEL_RATE_LIMITS`` may give a caller its own), per
end user (``X-User-ID``, across callers) and per client address for failed
authentications. Only requests without a valid key
touch the address budget: a caller with a valid key behind the same address
(a NAT, a shared proxy) keeps working while a guesser next to it is refused,
and a valid request costs no extra round trip to Redis. Keys from
``citadel keygen`` are 256-bit random, so a guess that happens to be right is
not a practical risk.

Why not slowapi on the request path: its ``Limiter`` calls the storage
synchronously, on the event loop, so a slow Redis would stall every request,
``/health`` included; and ``SlowAPIMiddleware`` is a ``BaseHTTPMiddleware``.
Citadel uses the same ``limits`` strategies and storage URIs slowapi would,
through ``limits.aio``, from its own plain-ASGI middleware.

When Redis cannot be reached (an error, or no answer within ``timeout_s``),
Citadel keeps serving on per-instance in-memory limits, logs it once, reports
``degraded`` on ``/health`` and in ``citadel_rate_limit_storage_degraded``, and
probes Redis in the background to go back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string

from citadel.config import SettingError, Settings
from citadel.errors import RateLimited
from citadel.metrics import Metrics

log = structlog.get_logger("citadel")

RECOVERY_PROBE_S = 2.0


class LocalWindows:
    """Fixed windows in process memory: the same semantics as ``limits``' fixed window.

    A window opens at a key's first hit and lasts the limit's period. This is
    the per-instance storage (and the fallback when Redis is away): a dict and
    two comparisons, where ``limits.aio``'s memory storage costs an asyncio lock
    and several coroutine hops per hit, a measurable share of a request here.
    Only the event loop's thread touches it.
    """

    __slots__ = ("_hits_since_sweep", "_windows")

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], list[float]] = {}
        self._hits_since_sweep = 0

    def hit(self, limit: RateLimitItem, scope: str, ident: str, cost: int = 1) -> bool:
        """Take ``cost`` units of ``key``'s budget if they fit; False (and nothing taken) if not."""
        now = time.monotonic()
        window = self._windows.get((scope, ident))
        if window is None or window[1] <= now:
            self._sweep(now)
            if cost > limit.amount:
                return False
            self._windows[(scope, ident)] = [cost, now + limit.get_expiry()]
            return True
        if window[0] + cost > limit.amount:
            return False
        window[0] += cost
        return True

    def refund(self, limit: RateLimitItem, scope: str, ident: str, cost: int = 1) -> None:
        """Give back ``cost`` units of a window that is still open."""
        window = self._windows.get((scope, ident))
        if window is not None and window[1] > time.monotonic():
            window[0] = max(0, window[0] - cost)

    def test(self, limit: RateLimitItem, scope: str, ident: str) -> bool:
        """Whether ``key`` has budget left, without taking any."""
        window = self._windows.get((scope, ident))
        return window is None or window[1] <= time.monotonic() or window[0] < limit.amount

    def reset_at(self, limit: RateLimitItem, scope: str, ident: str) -> float:
        """Wall-clock time at which the key's window ends."""
        window = self._windows.get((scope, ident))
        left = window[1] - time.monotonic() if window else limit.get_expiry()
        return time.time() + max(0.0, left)

    def _sweep(self, now: float) -> None:
        # Bounded memory: drop ended windows every so often as keys come and go.
        self._hits_since_sweep += 1
        if self._hits_since_sweep >= 1024:
            self._hits_since_sweep = 0
            self._windows = {k: w for k, w in self._windows.items() if w[1] > now}


class RateLimiter:
    """The contract's three budgets (caller, user, auth failures) on ``limits.aio`` storage.

    Shared between instances through Redis when the storage URI names one.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        timeout_s: float = 0.5,
        recovery_probe_s: float = RECOVERY_PROBE_S,
    ) -> None:
        self._limits: dict[str, RateLimitItem] = {
            "caller": parse(settings.rate_limit_per_caller),
            "user": parse(settings.rate_limit_per_user),
            "auth": parse(settings.rate_limit_auth_failures),
        }
        # CITADEL_RATE_LIMITS: a caller's own limit replaces the per-caller default.
        self._caller_limits = {
            caller: parse(limit) for caller, limit in (settings.rate_limits or {}).items()
        }
        self._metrics = metrics
        self._rejected = {scope: metrics.rate_limited.labels(scope) for scope in self._limits}
        self._timeout = timeout_s
        self._probe_every = recovery_probe_s
        self._memory = LocalWindows()
        self._shared_storage: Storage | None = None
        self._shared: FixedWindowRateLimiter | None = None
        uri = settings.rate_limit_storage_uri
        if not uri.startswith("memory://"):
            try:
                storage = storage_from_string(
                    "async+" + uri,
                    wrap_exceptions=True,
                    connect_timeout=timeout_s,
                    stream_timeout=timeout_s,
                )
            except Exception:
                # The library's message quotes the URI, password included.
                raise SettingError(
                    "CITADEL_RATE_LIMIT_STORAGE_URI", "is not a usable storage URI"
                ) from None
            assert isinstance(storage, Storage)
            self._shared_storage = storage
            self._shared = FixedWindowRateLimiter(storage)
        self.degraded = False
        self._recovery: asyncio.Task[None] | None = None
        metrics.limiter_degraded.set(0)

    @property
    def shared(self) -> bool:
        """Whether the budgets live in a storage other instances share."""
        return self._shared is not None

    async def start(self) -> None:
        """Check the shared storage once, so an unreachable Redis shows at start-up."""
        if self._shared_storage is not None and not await self._check():
            self._degrade()

    async def aclose(self) -> None:
        """Close the storage connection."""
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery

    async def hit_auth_failure(self, address: str) -> None:
        """Count a failed authentication; raise ``RateLimited`` once over budget."""
        limit = self._limits["auth"]
        if not await self._hit(limit, "auth", address):
            await self._reject(limit, "auth", address)

    async def hit_caller(
        self, caller: str, user: str | None, *, cost: int = 1, already: int = 0
    ) -> None:
        """Spend ``cost`` units of the caller's budget and, with a user id, of the user's.

        A request refused by one limit is not charged to the other: one user's
        refused retries must not use up the caller's budget for every other
        user. The caller's units are given back when the user's limit refuses:
        an extra round trip on refusals only, where checking both first would
        cost one on every request. ``already`` is what this request was charged
        before (a batch's first unit): a refused batch gets that back too, so
        it costs nothing.
        """
        limit = self._caller_limits.get(caller, self._limits["caller"])
        if not await self._hit(limit, "caller", caller, cost):
            if already:
                await self._give_back(limit, "caller", caller, already)
                if user is not None:
                    await self._give_back(self._limits["user"], "user", user, already)
            await self._reject(limit, "caller", caller, cost + already)
        if user is not None:
            user_limit = self._limits["user"]
            if not await self._hit(user_limit, "user", user, cost):
                await self._give_back(limit, "caller", caller, cost + already)
                if already:
                    await self._give_back(user_limit, "user", user, already)
                await self._reject(user_limit, "user", user, cost + already)

    async def _hit(self, limit: RateLimitItem, scope: str, ident: str, cost: int = 1) -> bool:
        """Take ``cost`` units if they fit; a refused hit takes nothing, in either storage."""
        if self._shared is not None and not self.degraded:
            try:
                # A refused hit still adds to the shared counter (INCRBY, then a
                # compare): for a batch, test first, so that a batch that cannot
                # fit never inflates the counter that concurrent requests read.
                if cost > 1 and not await asyncio.wait_for(
                    self._shared.test(limit, scope, ident, cost=cost), self._timeout
                ):
                    return False
                ok = await asyncio.wait_for(
                    self._shared.hit(limit, scope, ident, cost=cost), self._timeout
                )
                if not ok and cost > 1:
                    # Lost a race after the test: give the refused units back.
                    await asyncio.wait_for(
                        self._shared.hit(limit, scope, ident, cost=-cost), self._timeout
                    )
                return bool(ok)
            except Exception:
                # Any trouble with the shared storage means: fall back, never fail.
                self._degrade()
        return self._memory.hit(limit, scope, ident, cost)

    async def _give_back(self, limit: RateLimitItem, scope: str, ident: str, cost: int) -> None:
        if self._shared is not None and not self.degraded:
            try:
                await asyncio.wait_for(
                    self._shared.hit(limit, scope, ident, cost=-cost), self._timeout
                )
                return
            except Exception:
                self._degrade()
        self._memory.refund(limit, scope, ident, cost)

    async def _reject(self, limit: RateLimitItem, scope: str, ident: str, cost: int = 1) -> None:
        self._rejected[scope].inc()
        reset_at = self._memory.reset_at(limit, scope, ident)
        if self._shared is not None and not self.degraded:
            with contextlib.suppress(Exception):
                stats = await asyncio.wait_for(
                    self._shared.get_window_stats(limit, scope, ident), self._timeout
                )
                reset_at = stats.reset_time
        retry_after = max(1, math.ceil(reset_at - time.time()))
        # A batch larger than a whole window never fits, however long it waits.
        detail = (
            f"The batch has more items than the {scope} limit allows in a whole window; "
            "send smaller batches."
            if cost > limit.amount
            else None
        )
        raise RateLimited(
            detail,
            retry_after=retry_after,
            headers=(
                ("X-RateLimit-Limit", str(limit.amount)),
                ("X-RateLimit-Remaining", "0"),
                ("X-RateLimit-Reset", str(math.ceil(reset_at))),
            ),
        )

    def _degrade(self) -> None:
        if self.degraded:
            return
        self.degraded = True
        self._metrics.limiter_degraded.set(1)
        log.error("rate_limit_storage_unreachable", fallback="per-instance memory limits")
        self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(self._probe_every)
            if await self._check():
                self.degraded = False
                self._metrics.limiter_degraded.set(0)
                log.warning("rate_limit_storage_recovered")
                return

    async def _check(self) -> bool:
        assert self._shared_storage is not None
        try:
            return bool(await asyncio.wait_for(self._shared_storage.check(), self._timeout))
        except Exception:
            return False
