"""``/health``, ``/ready`` and ``/metrics``: FastAPI routes, no authentication, no audit."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from citadel.metrics import CONTENT_TYPE_LATEST
from citadel.status import StatusReport


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def add_status_routes(app: FastAPI, status: StatusReport) -> None:
    """Add the three status routes to ``app``; their bodies never show a setting's value."""

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        return _json(status.body())

    @app.get("/ready", include_in_schema=False)
    async def ready() -> Response:
        return _json(status.body(), 200 if status.ready() else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        status.refresh_gauges()
        return Response(status.metrics.render(), media_type=CONTENT_TYPE_LATEST)
