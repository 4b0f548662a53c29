"""``create_app``: wiring only. Every part is built once here, never per request."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO, Any

import structlog
from fastapi import FastAPI

from citadel.audit import AuditLog
from citadel.config import ProviderName, SettingError, Settings
from citadel.http.addresses import ClientAddresses
from citadel.http.body import BodyDeadlines, BodyLimits
from citadel.http.errors import install_error_handlers
from citadel.http.openapi import openapi_document
from citadel.http.operations import Operations
from citadel.http.pipeline import Pipeline
from citadel.http.status_routes import add_status_routes
from citadel.metrics import Metrics
from citadel.providers.base import Provider
from citadel.providers.local import LocalProvider
from citadel.pseudonyms import Pseudonymizer, pseudonym_key
from citadel.ratelimit import RateLimiter
from citadel.security import Authenticator, KeyFileWatcher, resolve_api_keys
from citadel.service import Vault
from citadel.sinks import StreamSink, stdout_sink
from citadel.status import VERSION, StatusReport
from citadel.tls import CallerBinding

log = structlog.get_logger("citadel")

# Room for a plaintext of the maximum size written entirely as JSON \\u escapes,
# or for the ciphertext of one, plus the rest of the JSON document.
BODY_LIMIT_FACTOR = 6
BODY_LIMIT_SLACK = 1024


# Only where FastAPI takes the argument (0.165 and later).
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def body_limits(settings: Settings) -> dict[str, int]:
    """Per operation, the largest body that can hold a valid single request."""
    secret = settings.max_plaintext_bytes * BODY_LIMIT_FACTOR + BODY_LIMIT_SLACK
    message = settings.max_sign_message_bytes * BODY_LIMIT_FACTOR
    return {"encrypt": secret, "decrypt": secret, "rewrap": secret, "sign": secret + message}


def batch_body_limits(settings: Settings) -> dict[str, BodyLimits]:
    """Per operation, the single limit and a batch's: one item's each, never past the cap.

    ``CITADEL_MAX_BATCH_BYTES`` bounds the memory a few hundred concurrent
    batches can take; both limits are checked before a body is parsed.
    """
    return {
        operation: BodyLimits(
            single, min(single * settings.max_batch_items, max(single, settings.max_batch_bytes))
        )
        for operation, single in body_limits(settings).items()
    }


def build_provider(name: ProviderName, settings: Settings, metrics: Metrics) -> Provider:
    """The provider ``name``, its keys loaded or about to be.

    The local keyring is created (in development) only when ``local`` is the
    encrypting provider: a keyring that only decrypts must already exist.
    """
    if name == "evervault":
        from citadel.providers.evervault import EvervaultProvider

        return EvervaultProvider.from_settings(settings, metrics)
    return LocalProvider.from_settings(settings, metrics, create=settings.provider == "local")


def create_app(
    settings: Settings,
    *,
    audit_sink: IO[bytes] | None = None,
    provider: Provider | None = None,
) -> Pipeline:
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
    encryptor = provider or build_provider(settings.provider, settings, metrics)
    decryptors = [
        encryptor if name == encryptor.name else build_provider(name, settings, metrics)
        for name in settings.decrypt_providers
    ]
    providers = list(dict.fromkeys([encryptor, *decryptors]))
    limiter = RateLimiter(settings, metrics)
    audit = AuditLog(StreamSink(audit_sink) if audit_sink is not None else stdout_sink())
    status = StatusReport(encryptor, metrics, limiter, decryptors=decryptors, audit=audit)
    status.refresh_gauges()
    deadlines = BodyDeadlines(settings.read_timeout_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for p in providers:
            await p.start()
        await limiter.start()
        await key_watcher.start()
        await deadlines.start()
        log.info(
            "citadel_started",
            provider=encryptor.name,
            decrypt_providers=[p.name for p in decryptors],
            env=settings.env,
            version=VERSION,
        )
        try:
            yield
        finally:
            await deadlines.aclose()
            await vault.aclose()
            await key_watcher.aclose()
            await limiter.aclose()
            for p in providers:
                await p.aclose()

    app = FastAPI(
        title="Citadel",
        version=VERSION,
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        # A redirect would send the caller, its body and its API key to
        # whatever the Host header names; a trailing slash is simply a 404.
        redirect_slashes=False,
        # FastAPI's native OpenTelemetry asks the global providers on every
        # request (14 us, an eighth of an /encrypt), and would export request
        # attributes to whatever provider a library in the process configured.
        # Citadel's own metrics and audit log are its telemetry.
        **_NO_TELEMETRY,
    )
    document = openapi_document(VERSION)
    app.openapi = lambda: document  # type: ignore[method-assign]
    app.state.settings = settings
    install_error_handlers(app)
    add_status_routes(app, status)
    vault = Vault(encryptor, decryptors, settings.max_plaintext_bytes)
    # The pipeline is the outermost app, FastAPI behind it: the operations go
    # through none of FastAPI's and Starlette's per-request layers (its
    # telemetry check, the error middleware wrapping every send), and every
    # other path, the lifespan included, is handed to FastAPI whole.
    return Pipeline(
        app,
        operations=Operations(
            vault,
            settings.max_sign_message_bytes,
            settings.max_batch_items,
            item_limits=body_limits(settings),
        ),
        authenticator=authenticator,
        audit=audit,
        metrics=metrics,
        pseudonymize=pseudonymize,
        body_limits=batch_body_limits(settings),
        deadlines=deadlines,
        limiter=limiter,
        addresses=ClientAddresses(settings.trusted_proxies),
        caller_binding=CallerBinding.from_settings(settings),
    )


def app_from_env() -> Pipeline:
    """Factory for ``uvicorn --factory`` and for each worker of ``citadel serve --workers N``."""
    from citadel.logs import configure_logging

    settings = Settings()
    configure_logging(settings)
    return create_app(settings)
