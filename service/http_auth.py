"""The API key at the HTTP edge: an ASGI middleware in front of every route but the health checks."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import HEALTH_PATHS, KeyCheck, Unauthorized
from service.http_errors import error_response


class ApiKeyMiddleware:
    """401 `unauthorized` (our error body, with the request id) before the route runs or the body is read."""

    def __init__(self, app: ASGIApp, keys: KeyCheck):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in HEALTH_PATHS:
            headers = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
            try:
                self.keys.check(headers)
            except Unauthorized as e:
                rid = scope.get("state", {}).get("request_id", "")
                response = error_response(e.status, e.code, e.message, rid, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
