"""Errors as the status-code contract says: one JSON body shape, mapped by exception type, with a request id."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.accounting import request_id as sane_request_id
from service.errors import InvalidParameter, Overloaded, ServiceError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID if sane), returns it in X-Request-ID, and turns
    any exception no handler mapped into a logged 500 `internal`, never a traceback in the body."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = sane_request_id(client_request_id(scope))
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id)
            if not started:  # once the answer has begun, closing the connection is all that is left
                response = error_response(500, "internal", "internal error; it was logged: retry, or report the "
                                          "request id", request_id)  # fmt: skip
                await response(scope, receive, send_with_id)


def client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER.encode():
            return value.decode("latin-1")
    return None


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def error_response(status: int, code: str, message: str, rid: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code, "request_id": rid}, status_code=status, headers=headers)


def service_error_response(error: ServiceError, rid: str) -> JSONResponse:
    headers = None
    if isinstance(error, Overloaded):
        headers = {"Retry-After": str(error.retry_after)}
    if error.status == 500:  # 503/504 are load, logged as metrics; a 500 is a fault someone must look at
        log.error("request %s: %s", rid, error.message)
    return error_response(error.status, error.code, error.message, rid, headers)


def validation_message(errors: Sequence[dict]) -> str:
    """FastAPI's error list as one sentence per parameter: `depth: Input should be a valid integer ...`."""
    by_param: dict[str, list[str]] = {}
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part not in ("query", "body")]
        name = loc[0] if loc else "request"
        text = "unknown parameter" if error.get("type") == "extra_forbidden" else error.get("msg", "invalid")
        by_param.setdefault(name, []).append(text)
    return "; ".join(f"{name}: {' or '.join(dict.fromkeys(msgs))}" for name, msgs in by_param.items())


def invalid_parameter(error: ValidationError) -> InvalidParameter:
    """The same message for parameters that came as form fields (validated by us, not by FastAPI)."""
    return InvalidParameter(validation_message(error.errors()))


def install(app: FastAPI) -> None:
    """Register the handlers and the request-id middleware on `app`."""

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, error: ServiceError) -> JSONResponse:
        return service_error_response(error, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_parameter", validation_message(error.errors()), request_id(request))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = HTTP_CODES.get(error.status_code, "bad_request" if error.status_code < 500 else "internal")
        return error_response(error.status_code, code, str(error.detail), request_id(request), error.headers)

    app.add_middleware(RequestIdMiddleware)
