"""Inference off the event loop, with admission by expected wait.

Decoding and the model run in a small thread pool (PIL, numpy and ONNX Runtime release the
GIL), so the event loop keeps answering health checks under load.

A request counts from the moment its upload starts (`admit`), not only once it reaches the
pool: a slow upload holds memory like a queued one. It is admitted while the wait it can
expect, (requests ahead / workers) x the measured time of one job (an exponentially weighted
moving average), stays under `max_queue_wait_s`, and while at most `queue_size` wait. Beyond
that a plain client gets 503 at once with a Retry-After computed from the same figures; a
client that said it would wait (`Prefer: wait=N`) is held, before its upload is read, until a
place frees up or N seconds pass. Refusing early is what keeps throughput up under overload:
a request that would time out anyway only steals time from those that will not.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from covid_cxr.service.responses import ApiError

T = TypeVar("T")
EWMA_WEIGHT = 0.2
FIRST_GUESS_S = 0.05  # one job's time before any has been measured


class InferencePool:
    """The worker threads plus the admission counter; only the event loop touches the counters,
    so they need no lock."""

    def __init__(self, workers: int, queue_size: int, max_queue_wait_s: float = 2.0) -> None:
        self.workers = workers
        self.capacity = workers + queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self.admitted = 0  # uploading, waiting or running
        self.service_s = FIRST_GUESS_S
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")

    def expected_wait(self) -> float:
        """Seconds a request admitted now would wait before a worker takes it."""
        ahead = self.admitted - self.workers + 1
        return max(0, ahead) * self.service_s / self.workers

    def _admissible(self) -> bool:
        return self.admitted < self.capacity and self.expected_wait() <= self.max_queue_wait_s

    def retry_after(self) -> int:
        """Whole seconds until a place should be free, from the measured service time."""
        over_wait = self.expected_wait() - self.max_queue_wait_s
        over_count = (self.admitted - self.capacity + 1) * self.service_s / self.workers
        return max(1, math.ceil(max(over_wait, over_count)))

    def overloaded(self) -> ApiError:
        return ApiError(
            503,
            "overloaded",
            f"the server is busy ({self.admitted} predictions uploading, running or waiting; "
            f"expected wait {self.expected_wait():.1f} s)",
            "retry after the Retry-After seconds, or send header 'Prefer: wait=N' to wait up "
            "to N seconds for a place",
            headers={"Retry-After": str(self.retry_after())},
        )

    @asynccontextmanager
    async def admit(self, wait_s: float = 0.0) -> AsyncIterator[None]:
        """Hold a place for one request from its upload to its answer, or raise 503."""
        if self._waiting or not self._admissible():
            await self._wait_for_place(wait_s)
        else:
            self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1
            self._hand_over()

    async def _wait_for_place(self, wait_s: float) -> None:
        """First come, first served; the place is counted for us by `_hand_over`."""
        if wait_s <= 0:
            raise self.overloaded()
        place = asyncio.get_running_loop().create_future()
        self._waiting.append(place)
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(place)
        except TimeoutError:
            if place.done():
                return  # handed over just as the time ran out: keep it
            raise self.overloaded() from None
        except BaseException:
            if place.done():  # handed over, but the request is going away: pass it on
                self.admitted -= 1
                self._hand_over()
            raise
        finally:
            if not place.done():
                place.cancel()
                self._waiting.remove(place)

    def _hand_over(self) -> None:
        while self._waiting and self._admissible():
            place = self._waiting.popleft()
            self.admitted += 1
            place.set_result(None)

    async def run(self, fn: Callable[..., T], *args: object, files: int = 1) -> T:
        """`fn(*args)` in a worker thread; its duration per file feeds the service-time
        average (a batch counts as one request in the queue, so a queue of batches is
        underestimated until their times come in)."""

        seconds: list[float] = []

        def timed() -> T:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                seconds.append(time.perf_counter() - start)

        try:
            return await asyncio.wrap_future(self._executor.submit(timed))
        finally:
            if seconds:
                per_file = seconds[0] / max(files, 1)
                self.service_s += EWMA_WEIGHT * (per_file - self.service_s)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
