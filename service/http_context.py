"""What an HTTP handler reads of its app: the one `Service` that `create_app` built."""

from __future__ import annotations

from starlette.requests import Request

from service.lifecycle import Service


def service(request: Request) -> Service:
    return request.app.state.service
