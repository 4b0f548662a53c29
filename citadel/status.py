"""What ``/health`` and ``/ready`` report, derived from the live parts."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from citadel.breaker import BreakerState
from citadel.metrics import Metrics
from citadel.providers.base import Provider

if TYPE_CHECKING:
    from citadel.audit import AuditLog
    from citadel.ratelimit import RateLimiter

try:
    VERSION = version("citadel")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0.0.0"


class StatusReport:
    """Ready when every provider can serve and the audit log can be written."""

    def __init__(
        self,
        provider: Provider,
        metrics: Metrics,
        limiter: RateLimiter | None = None,
        *,
        decryptors: Sequence[Provider] = (),
        audit: AuditLog | None = None,
    ) -> None:
        self.provider = provider
        self.providers = tuple(dict.fromkeys([provider, *decryptors]))
        self.metrics = metrics
        self.limiter = limiter
        self.audit = audit

    def _breaker(self) -> BreakerState:
        """The worst breaker among the providers (only Evervault has one)."""
        states = [p.breaker_state() for p in self.providers]
        for state in (BreakerState.OPEN, BreakerState.HALF_OPEN):
            if state in states:
                return state
        return BreakerState.CLOSED

    def ready(self) -> bool:
        """What ``/ready`` answers: a request sent now could be served and audited."""
        return (
            all(p.ready() for p in self.providers)
            and self._breaker() is not BreakerState.OPEN
            and (self.audit is None or self.audit.healthy())
        )

    def body(self) -> dict[str, Any]:
        """The ``/health`` body: degraded when not ready or when the rate limiter runs degraded."""
        degraded = not self.ready() or (self.limiter is not None and self.limiter.degraded)
        return {
            "status": "degraded" if degraded else "healthy",
            "service": "citadel",
            "version": VERSION,
            "provider": self.provider.name,
            "breaker": self._breaker().value,
            "decrypt_providers": [p.name for p in self.providers],
        }

    def refresh_gauges(self) -> None:
        """Set the breaker and limiter gauges from the live parts, so a scrape sees them now."""
        for provider in self.providers:
            # Only a provider with a breaker has a series: a constant 0 for the
            # local keyring would say there is a breaker to watch.
            if provider.has_breaker:
                self.metrics.breaker_state.labels(provider.name).set(provider.breaker_state().gauge)
        if self.limiter is not None:
            self.metrics.limiter_degraded.set(1 if self.limiter.degraded else 0)
