"""The FastAPI app factory: nothing happens at import; models load in the lifespan (or before, in `srvit serve`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service import http_errors, routes, v2
from service.http_auth import ApiKeyMiddleware
from service.lifecycle import Service
from service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """One app per Settings: its own Service, registry and device, so tests can run several side by side."""
    service = Service(settings or Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="srvit",
        summary="Recursive ViT classification with depth as a per-request latency/accuracy knob",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(routes.router)
    app.include_router(v2.router)
    app.add_middleware(ApiKeyMiddleware, keys=service.keys)  # inside the request-id middleware: 401s carry the id
    http_errors.install(app)
    return app
