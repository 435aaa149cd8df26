"""What recording a prediction in the audit trail costs, per event, against not recording.

Each store records N events from 1 thread and from 4 threads (the service's inference pool
records from its threads), every event committed on its own as in production:
  baseline  NullRecorder (building the event, nothing stored)
  sqlite    the default store, a WAL-mode SQLite file with synchronous=NORMAL, on local disk
  postgres  with --postgres URL, e.g. a local server (a unix socket: the cheapest network)
Compare the per-event figure with one prediction: the shipped model takes 8-14 ms per 640-px
JPEG on this machine (README), so a store that adds well under 1 ms is noise there.

    python benchmarks/audit_record.py [--events 2000] [--postgres postgresql://...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from covid_cxr.audit.events import NullRecorder, PredictionEvent, new_request_id, utc_now
from covid_cxr.audit.store import open_store


def make_event(n: int) -> PredictionEvent:
    return PredictionEvent(
        time=utc_now(),
        request_id=new_request_id(),
        channel="api",
        who="key-1",
        input_sha256=hashlib.sha256(n.to_bytes(8, "little")).hexdigest(),
        input_format="JPEG",
        input_bytes=60_000 + n,
        model_name="efficientnet-lite0",
        model_version="bench",
        outcome="predicted",
        probability=0.25,
        threshold=0.1,
        label="COVID-19",
        latency_ms=9.5,
    )


def measure(record: Callable[[PredictionEvent], None], events: int, threads: int) -> list[float]:
    """Per-event wall time (ms) of `record`, the events split among `threads`."""
    times: list[float] = []
    lock = threading.Lock()

    def work(start: int) -> None:
        mine = []
        for n in range(start, events, threads):
            event = make_event(n)
            t0 = time.perf_counter()
            record(event)
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            times.extend(mine)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return times


def report(name: str, times: list[float], wall_s: float, baseline: float | None) -> float:
    p50 = statistics.median(times)
    p99 = statistics.quantiles(times, n=100)[98]
    rate = len(times) / wall_s
    extra = f"  (+{p50 - baseline:.3f} ms p50 over baseline)" if baseline is not None else ""
    print(f"{name:<22} p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  {rate:9.0f} events/s{extra}")
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--postgres", help="a PostgreSQL URL to measure too")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, Callable[[], object]] = {
            "baseline": NullRecorder,
            "sqlite": lambda: open_store(f"sqlite:///{Path(tmp) / 'audit.db'}"),
        }
        if args.postgres:
            stores["postgres"] = lambda: open_store(args.postgres)
        for threads in (1, 4):
            baseline = None
            for name, opener in stores.items():
                store = opener()
                start = time.perf_counter()
                times = measure(store.record, args.events, threads)  # type: ignore[attr-defined]
                p50 = report(f"{name}, {threads} thread(s)", times, time.perf_counter() - start,
                             baseline)  # fmt: skip
                baseline = p50 if name == "baseline" else baseline
                store.close()  # type: ignore[attr-defined]
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
