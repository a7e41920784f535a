"""The errors a request can end in, each carrying its status and `code` from the status-code contract."""

from __future__ import annotations

import math


class ServiceError(Exception):
    """Base of every error a client may see: the app maps `status` and `code` to the JSON error body.

    The message is shown to the client, so it says what to do and never holds a traceback.
    """

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidImage(ServiceError):
    status, code = 400, "invalid_image"


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class ImageTooLarge(ServiceError):
    status, code = 422, "image_too_large"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class ModelControlDisabled(ServiceError):
    """Loading or unloading a model: the repository is fixed at start-up (Triton's model control mode none)."""

    status, code = 400, "model_control_disabled"


class Overloaded(ServiceError):
    """Queue full: `retry_after_s` feeds the Retry-After header (whole seconds, at least 1)."""

    status, code = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> int:
        """Whole seconds, at least 1: HTTP's Retry-After and gRPC's RetryInfo."""
        return max(1, math.ceil(self.retry_after_s))


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class ClientClosedRequest(ServiceError):
    """The client went away before its answer; nobody reads this status, but logs and metrics count it."""

    status, code = 499, "client_closed_request"


class InferenceFailed(ServiceError):
    """The graph raised or returned garbage; the cause stays in `__cause__` for the log, not the client."""

    status, code = 500, "internal"
