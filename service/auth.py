"""Optional API keys for every protocol: one key (SRVIT_API_KEY, or SRVIT_API_KEY_FILE for a mounted secret),
presented as `Authorization: Bearer <key>` or `X-API-Key: <key>` (HTTP headers or gRPC metadata), compared in
constant time. Health checks never need it, so probes and balancers work without the secret."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

from service.errors import ServiceError
from service.settings import Settings, is_usable_key

# Paths a key is never asked for: liveness and readiness, as load balancers and Kubernetes probe them.
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class StartupKeyError(Exception):
    """The key file cannot be read: start-up stops with this message."""


def api_key(settings: Settings) -> bytes | None:
    """The configured key, or None when the API is open."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value().encode()
    if settings.api_key_file is None:
        return None
    try:
        key = settings.api_key_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise StartupKeyError(f"cannot read api_key_file {settings.api_key_file}: {getattr(e, 'strerror', e)}") from e
    if not is_usable_key(key):
        raise StartupKeyError(f"api_key_file {settings.api_key_file}: the key must be 8 or more printable ASCII "
                              "characters, no spaces")  # fmt: skip
    return key.encode()


def presented(pairs: Iterable[tuple[str, str]]) -> str | None:
    """The key from `authorization: Bearer ...` or `x-api-key`, header or metadata names in lower case."""
    for name, value in pairs:
        if name == "x-api-key":
            return value
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


class KeyCheck:
    """`check(pairs)` raises Unauthorized unless the right key is among them; a no-op without a key."""

    def __init__(self, key: bytes | None, on_refused: Callable[[], None]):
        self.key, self.on_refused = key, on_refused

    def check(self, pairs: Iterable[tuple[str, str]]) -> None:
        if self.key is None:
            return
        given = presented(pairs)
        if given is None or not hmac.compare_digest(given.encode("latin-1", "replace"), self.key):
            self.on_refused()
            shown = "no API key was sent" if given is None else "the API key is wrong"
            raise Unauthorized(f"{shown}: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
