"""The service's guards: accepted formats, security headers, the API key, the last-resort 500.

The middlewares are plain ASGI (no BaseHTTPMiddleware) so they cost microseconds per request.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from covid_cxr.service.responses import error_response
from covid_cxr.service.schemas import ErrorBody

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("covid_cxr.service")

FORMATS = ("PNG", "JPEG", "DICOM")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), interest-cohort=()"),
]
NO_STORE = (b"cache-control", b"no-store")


def _is_api(path: str) -> bool:
    return path.startswith("/api/")


class SecurityHeaders:
    """Adds the security headers to every response, and no-store to API answers (they are
    about a patient's image and must not sit in shared caches)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = SECURITY_HEADERS + ([NO_STORE] if _is_api(scope["path"]) else [])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    header for header in extra if header[0] not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ApiKeyGuard:
    """When a key is configured, /api/* answers 401 without a matching X-API-Key header.

    The page, its assets, /docs and the health checks stay open: the page asks for the key.
    CORS preflights (OPTIONS) are answered by the CORS middleware before this runs.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or not _is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"")
        if hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        await error_response(
            401,
            ErrorBody(
                code="unauthorized",
                message="missing API key" if not given else "wrong API key",
                hint="send the service's key in the X-API-Key header",
            ),
        )(scope, receive, send)


class LastResortErrors:
    """Turns an unexpected exception into a bare 500 JSON and keeps the server up.

    Logs the exception type only: messages and tracebacks can carry upload content or DICOM
    patient fields, which must never reach the logs.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error(
                "internal error %s on %s %s", type(exc).__name__, scope["method"], scope["path"]
            )
            if not started:
                await error_response(
                    500,
                    ErrorBody(
                        code="internal_error",
                        message="the server failed on this request",
                        hint="the failure was logged by type; try again or report it",
                    ),
                )(scope, receive, send)
