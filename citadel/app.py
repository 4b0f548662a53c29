"""``create_app``: wiring only. Every part is built once here, never per request."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO

import structlog
from fastapi import FastAPI

from citadel.api import add_routes
from citadel.audit import AuditLog, Pseudonymizer, pseudonym_key
from citadel.config import SettingError, Settings
from citadel.http_errors import install_error_handlers
from citadel.metrics import Metrics
from citadel.middleware import CitadelMiddleware
from citadel.providers.base import Provider
from citadel.providers.local import LocalProvider
from citadel.ratelimit import RateLimiter
from citadel.security import Authenticator, KeyFileWatcher, resolve_api_keys
from citadel.service import Vault
from citadel.status import VERSION, StatusReport

log = structlog.get_logger("citadel")

# Room for a plaintext of the maximum size written entirely as JSON \\u escapes,
# or for the ciphertext of one, plus the rest of the JSON document.
BODY_LIMIT_FACTOR = 6
BODY_LIMIT_SLACK = 1024


def build_provider(settings: Settings, metrics: Metrics) -> Provider:
    """The provider named by ``CITADEL_PROVIDER``, its keys loaded or about to be."""
    if settings.provider == "evervault":
        from citadel.providers.evervault import EvervaultProvider

        return EvervaultProvider.from_settings(settings, metrics)
    return LocalProvider.from_settings(settings, metrics, create=True)


def create_app(
    settings: Settings,
    *,
    audit_sink: IO[bytes] | None = None,
    provider: Provider | None = None,
) -> FastAPI:
    """Build Citadel for ``settings``; ``SettingError`` or ``KeyringError`` on bad set-ups."""
    if settings.env == "production" and settings.docs_enabled:
        raise SettingError("CITADEL_DOCS", "must be off in production")
    keys, dev_keys_file = resolve_api_keys(settings)
    authenticator = Authenticator.build(keys, settings.acl)
    key_watcher = KeyFileWatcher(settings, authenticator)
    if dev_keys_file is not None:
        log.warning("dev_api_keys_in_use", path=str(dev_keys_file))
    pseudonymize = Pseudonymizer(pseudonym_key(settings))
    metrics = Metrics()
    provider = provider or build_provider(settings, metrics)
    limiter = RateLimiter(settings, metrics)
    status = StatusReport(provider, metrics, limiter)
    status.refresh_gauges()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await provider.start()
        await limiter.start()
        await key_watcher.start()
        log.info("citadel_started", provider=provider.name, env=settings.env, version=VERSION)
        try:
            yield
        finally:
            await key_watcher.aclose()
            await limiter.aclose()
            await provider.aclose()

    app = FastAPI(
        title="Citadel",
        version=VERSION,
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    add_routes(app, Vault(provider, authenticator, settings.max_plaintext_bytes), status)
    app.add_middleware(
        CitadelMiddleware,
        authenticator=authenticator,
        audit=AuditLog(audit_sink if audit_sink is not None else sys.stdout.buffer),
        metrics=metrics,
        pseudonymize=pseudonymize,
        body_limit=settings.max_plaintext_bytes * BODY_LIMIT_FACTOR + BODY_LIMIT_SLACK,
        limiter=limiter,
    )
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and for each worker of ``citadel serve --workers N``."""
    from citadel.audit import configure_logging

    settings = Settings()
    configure_logging(settings)
    return create_app(settings)
