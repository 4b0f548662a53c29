"""What ``/health`` and ``/ready`` report, derived from the live parts."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from citadel.metrics import Metrics
from citadel.providers.base import BreakerState, Provider

if TYPE_CHECKING:
    from citadel.ratelimit import RateLimiter

try:
    VERSION = version("citadel")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0.0.0"


class StatusReport:
    def __init__(
        self, provider: Provider, metrics: Metrics, limiter: RateLimiter | None = None
    ) -> None:
        self.provider = provider
        self.metrics = metrics
        self.limiter = limiter

    def ready(self) -> bool:
        return self.provider.ready() and self.provider.breaker_state() is not BreakerState.OPEN

    def body(self) -> dict[str, Any]:
        breaker = self.provider.breaker_state()
        degraded = (
            breaker is BreakerState.OPEN
            or not self.provider.ready()
            or (self.limiter is not None and self.limiter.degraded)
        )
        return {
            "status": "degraded" if degraded else "healthy",
            "service": "citadel",
            "version": VERSION,
            "provider": self.provider.name,
            "breaker": breaker.value,
        }

    def refresh_gauges(self) -> None:
        self.metrics.breaker_state.labels(self.provider.name).set(
            self.provider.breaker_state().gauge
        )
        if self.limiter is not None:
            self.metrics.limiter_degraded.set(1 if self.limiter.degraded else 0)
