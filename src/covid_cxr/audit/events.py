"""What one prediction leaves in the audit trail, and the interface of whatever stores it.

An event carries no pixels, no uploaded file name and no DICOM patient attribute: only what
is needed to show later which model said what about which input (by its sha256), for whom,
and how fast. The service and `covid-cxr predict` hand every event to a `Recorder` and
return the result only after `record` has returned (durably stored).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

Channel = Literal["api", "cli"]
# "predicted": a probability was returned; "refused": the input gate said out of scope;
# "failed": the input could not be read or used (the reason code says why).
Outcome = Literal["predicted", "refused", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("predicted", "refused", "failed")
# Reason codes that mean "refused by the input gate" rather than "failed".
REFUSAL_CODES = frozenset({"out_of_scope"})
CHANNELS: tuple[Channel, ...] = ("api", "cli")


@dataclass(frozen=True)
class PredictionEvent:
    time: str  # ISO 8601, UTC
    request_id: str
    channel: Channel
    who: str | None  # an API key's id (never the key), or None without a key / on the CLI
    input_sha256: str | None  # None only when there were no bytes to hash (no such file)
    input_format: str | None  # PNG, JPEG, DICOM; None when unreadable
    input_bytes: int
    model_name: str
    model_version: str
    outcome: Outcome
    reason: str | None = None  # error or refusal code, e.g. "out_of_scope", "corrupt_image"
    probability: float | None = None
    threshold: float | None = None
    label: str | None = None
    latency_ms: float | None = None


def utc_now() -> str:
    """The current time as an event wants it: ISO 8601 in UTC, to the microsecond."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def outcome_of(code: str | None) -> Outcome:
    """The outcome of a result with this error code (None: it was predicted)."""
    if code is None:
        return "predicted"
    return "refused" if code in REFUSAL_CODES else "failed"


def new_request_id() -> str:
    """A fresh random id for a request that arrived without one."""
    return uuid.uuid4().hex


class Recorder(Protocol):
    """Stores events durably; `record` returns only once the event would survive a kill -9."""

    def record(self, event: PredictionEvent) -> None: ...

    def close(self) -> None:
        """Release the store's connections (at shutdown)."""


class NullRecorder:
    """Records nothing: for library use and tests that do not look at the trail."""

    def record(self, event: PredictionEvent) -> None:
        return None

    def close(self) -> None:
        return None
