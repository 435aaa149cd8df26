"""Reading the trail back: export (CSV or JSON lines) and a summary of what was recorded."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TextIO

import numpy as np

from covid_cxr.audit.events import PredictionEvent
from covid_cxr.audit.store import FIELDS

ExportFormat = Literal["csv", "jsonl"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("csv", "jsonl")


def write_events(events: Iterable[PredictionEvent], stream: TextIO, fmt: ExportFormat) -> int:
    """Write every event as a CSV row (empty cell for none) or a JSON line; returns the count."""
    count = 0
    writer = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(FIELDS)
    for event in events:
        values = dataclasses.astuple(event)
        if writer is not None:
            writer.writerow("" if value is None else value for value in values)
        else:
            stream.write(json.dumps(dict(zip(FIELDS, values, strict=True))) + "\n")
        count += 1
    return count


@dataclass
class AuditStats:
    """Counts by outcome, model and channel; latency percentiles; the time span covered."""

    total: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)  # "name version"
    by_channel: Counter[str] = field(default_factory=Counter)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    first: str | None = None
    last: str | None = None

    def lines(self) -> list[str]:
        """The summary as `covid-cxr audit stats` prints it."""
        if not self.total:
            return ["no events recorded"]
        out = [f"events: {self.total}", f"from {self.first} to {self.last}"]
        for title, counts in (
            ("outcome", self.by_outcome),
            ("model", self.by_model),
            ("channel", self.by_channel),
        ):
            out.append(f"by {title}:")
            out += [f"  {name:<48} {n:>9}" for name, n in counts.most_common()]
        if self.latency_p50_ms is not None:
            out.append(
                f"latency: p50 {self.latency_p50_ms:.1f} ms, p95 {self.latency_p95_ms:.1f} ms"
            )
        return out

    def as_dict(self) -> dict[str, object]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs, counting them.
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Counter) else value
        return out


def summarise(events: Iterable[PredictionEvent]) -> AuditStats:
    """One pass over the events (they arrive in time order)."""
    stats = AuditStats()
    latencies: list[float] = []
    for event in events:
        stats.total += 1
        stats.by_outcome[event.outcome] += 1
        stats.by_model[f"{event.model_name} {event.model_version}"] += 1
        stats.by_channel[event.channel] += 1
        if event.latency_ms is not None:
            latencies.append(event.latency_ms)
        stats.first = stats.first or event.time
        stats.last = event.time
    if latencies:
        p50, p95 = np.percentile(np.asarray(latencies), [50, 95])
        stats.latency_p50_ms, stats.latency_p95_ms = float(p50), float(p95)
    return stats
