"""Connection-level guards under uvicorn's httptools protocol, and uvicorn's options.

uvicorn bounds neither the size of a request head nor the life of a connection that never
sends one: a 50 MiB header was accepted, and 1,100 idle sockets exhausted the file
descriptors until /healthz failed. `GuardedHttpTools` adds, per process:

* a request head larger than max_header_kb gets 431 and the connection is closed;
* a connection must start a request within keep_alive_s of opening (or of its last answer,
  uvicorn's own keep-alive timeout), and finish the head within HEAD_TIMEOUT_S;
* beyond max_connections open connections a new one closes the longest-idle connection (one
  with no request in progress), or gets 503 when all are busy, so a crowd of idle sockets
  can never lock out a health check.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from covid_cxr.service.settings import ServiceSettings

log = logging.getLogger("covid_cxr.service")

HEAD_TIMEOUT_S = 10.0


def _raw_response(status: str, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


@functools.cache
def _limits() -> tuple[int, int]:
    """(max_connections, max head bytes) of this process's settings (from COVID_CXR_*)."""
    settings = ServiceSettings.from_env()
    return settings.max_connections, settings.max_header_kb * 1024


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded heads, head deadlines and a connection cap."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.last_active = time.monotonic()
        self.head_bytes = 0
        self.head_done = True
        self.head_timer: asyncio.TimerHandle | None = None
        max_connections, _ = _limits()
        if len(self.connections) > max_connections and not self._evict_idle():
            self._close_with(_raw_response("503 Service Unavailable", "too many connections\n"))
            return
        # Close a connection that never sends a request, as uvicorn does after an answer.
        loop = asyncio.get_running_loop()
        self.timeout_keep_alive_task = loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def idle(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def _evict_idle(self) -> bool:
        """Close the connection idle the longest; False when every other one is busy."""
        idle = [
            conn
            for conn in self.connections
            if conn is not self and isinstance(conn, GuardedHttpTools) and conn.idle()
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda conn: conn.last_active)
        oldest.transport.close()
        self.connections.discard(oldest)
        log.debug("closed an idle connection to make room")
        return True

    def _close_with(self, response: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        super().data_received(data)
        if self.head_done or self.transport.is_closing():
            return
        self.head_bytes += len(data)
        if self.head_bytes > _limits()[1]:
            self._close_with(
                _raw_response("431 Request Header Fields Too Large", "request head too large\n")
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_done = False
        self.head_bytes = 0
        self.head_timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, self._head_late)

    def _head_late(self) -> None:
        if not self.head_done:
            self._close_with(_raw_response("408 Request Timeout", "request head too slow\n"))

    def on_headers_complete(self) -> None:
        self.head_done = True
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments of uvicorn.run for these settings."""
    return {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "server_header": False,
        "http": GuardedHttpTools,
        "backlog": max(128, settings.max_connections),
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": 10,
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
    }
