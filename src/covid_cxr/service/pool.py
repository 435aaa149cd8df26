"""Inference off the event loop, with a bounded queue.

Decoding and the model run in a small thread pool (PIL, numpy and ONNX Runtime release the
GIL), so the event loop keeps answering health checks under load. Beyond `workers + queue`
requests in flight a new one is refused with 503 at once: a queue that grows without bound
only turns overload into timeouts for everyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from covid_cxr.service.responses import ApiError

T = TypeVar("T")


class InferencePool:
    def __init__(self, workers: int, queue_size: int) -> None:
        self.limit = workers + queue_size
        self.in_flight = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")

    def check(self) -> None:
        """Refuse at once when full, before an upload is even read."""
        if self.in_flight >= self.limit:
            raise ApiError(
                503,
                "overloaded",
                f"the server is busy ({self.in_flight} predictions running or waiting)",
                "retry in a moment",
                headers={"Retry-After": "1"},
            )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        # Only the event loop thread touches the counter, so it needs no lock.
        self.check()
        self.in_flight += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(fn, *args))
        finally:
            self.in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
