"""The service's guards: accepted formats, security headers, the API key, the last-resort 500.

The middlewares are plain ASGI (no BaseHTTPMiddleware) so they cost microseconds per request.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import time
import uuid
from collections import deque
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
    CORS preflights (OPTIONS) are answered by the CORS middleware before this runs. A client
    (by address) that sends `max_failures` wrong keys within `window_s` gets 429 until the
    oldest failure leaves the window. No key, right or wrong, is ever logged or echoed.
    """

    def __init__(
        self, app: ASGIApp, api_key: str | None, max_failures: int = 10, window_s: float = 60.0
    ) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.failures = FailureLimiter(max_failures, window_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or not _is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.failures.blocked_for(client)
        if wait:
            body = ErrorBody(
                code="too_many_requests",
                message="too many requests with a wrong API key from this address",
                hint=f"check the key, then retry after {wait} s",
            )
            await error_response(429, body, {"Retry-After": str(wait)})(scope, receive, send)
            return
        given = header(scope, b"x-api-key")
        if hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        self.failures.add(client)
        await error_response(
            401,
            ErrorBody(
                code="unauthorized",
                message="missing API key" if not given else "wrong API key",
                hint="send the service's key in the X-API-Key header",
            ),
        )(scope, receive, send)


class FailureLimiter:
    """Failures per client in a sliding window; bounded memory (oldest clients dropped)."""

    def __init__(self, limit: int, window_s: float, max_clients: int = 10_000) -> None:
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self._times: dict[str, deque[float]] = {}

    def add(self, client: str) -> None:
        if client not in self._times and len(self._times) >= self.max_clients:
            self._times.pop(next(iter(self._times)))
        self._times.setdefault(client, deque(maxlen=self.limit)).append(time.monotonic())

    def blocked_for(self, client: str) -> int:
        """Whole seconds this client must wait (0: not blocked)."""
        times = self._times.get(client)
        if not times or len(times) < self.limit:
            return 0
        left = times[0] + self.window_s - time.monotonic()
        if left <= 0:
            del self._times[client]
            return 0
        return math.ceil(left)


class HostGuard:
    """Answers 400 unless the Host header names this server: a web page on another site whose
    DNS name is re-pointed at 127.0.0.1 (DNS rebinding) must not reach the API."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str], any_ip: bool) -> None:
        self.app = app
        self.allowed = allowed
        self.any_ip = any_ip

    def accepts(self, host: str) -> bool:
        if "*" in self.allowed or host in self.allowed:
            return True
        if not self.any_ip:
            return False
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = header(scope, b"host").decode("latin-1").strip().lower()
        host = raw.rsplit(":", 1)[0] if raw.rsplit(":", 1)[-1].isdigit() else raw
        if self.accepts(host):
            await self.app(scope, receive, send)
            return
        body = ErrorBody(
            code="bad_host",
            message="this server does not answer to the host name in the request",
            hint="use the server's own address; its operator can add names with --allowed-host",
        )
        await error_response(400, body)(scope, receive, send)


def allowed_hosts(bind: str, configured: tuple[str, ...]) -> tuple[frozenset[str], bool]:
    """The Host names to accept, and whether any IP address is fine (binding all interfaces)."""
    names = {"localhost", "127.0.0.1", "::1", "[::1]", bind.lower(), f"[{bind.lower()}]"}
    names |= {name.lower() for name in configured}
    return frozenset(names), bind in ("0.0.0.0", "::", "")


class RequestId:
    """Gives every request an id (scope state `request_id`), returned as X-Request-ID: the
    audit trail and the logs can then name a request without naming its content."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def header(scope: Scope, name: bytes) -> bytes:
    return next((v for k, v in scope["headers"] if k == name), b"")


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
