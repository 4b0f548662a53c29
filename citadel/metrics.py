"""Prometheus metrics, one registry per app so that test apps do not collide.

Label values are bounded and never secret: operations, configured caller names
(or ``unknown``), contract codes, provider names, limit scopes, keyring key
ids (8 hex digits that name a key, not key material).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The contract's Prometheus metrics, in one registry per app (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "citadel_requests",
            "Encrypt and decrypt requests by outcome.",
            ["operation", "caller", "code"],
            registry=self.registry,
        )
        self.batch_items = Counter(
            "citadel_batch_items",
            "Items of batch requests by outcome (a batch counts once in citadel_requests_total).",
            ["operation", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "citadel_request_duration_seconds",
            "Time from request start to response start.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.provider_calls = Counter(
            "citadel_provider_calls",
            "Calls to the provider by outcome (ok, invalid, failure, rejected, rate_limited).",
            ["provider", "operation", "outcome"],
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "citadel_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "citadel_rate_limited",
            "Requests refused by a rate limit, by scope (caller, user, auth).",
            ["scope"],
            registry=self.registry,
        )
        self.keyring_decrypts = Counter(
            "citadel_keyring_decrypts",
            "Successful local-provider decrypts by keyring key id: a key that stays at zero "
            "no longer decrypts stored data, so it can retire.",
            ["key_id"],
            registry=self.registry,
        )
        self.limiter_degraded = Gauge(
            "citadel_rate_limit_storage_degraded",
            "1 while the shared rate-limit storage is unreachable and limits are per instance.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format, for /metrics."""
        return generate_latest(self.registry)
