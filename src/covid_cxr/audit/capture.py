"""Turn one `covid-cxr predict` result into an audit event.

The file is identified by the sha256 of its bytes, never by its name or path, and nothing of
its DICOM header is kept: the trail shows which model said what about which bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr.audit.events import PredictionEvent, new_request_id, outcome_of, utc_now
from covid_cxr.imaging.read import sniff_format

CHUNK = 1 << 20
SNIFF_BYTES = 132  # enough for sniff_format: the DICOM preamble and "DICM"

if TYPE_CHECKING:
    from covid_cxr.inference.batch import Failure
    from covid_cxr.inference.predictor import Prediction, Predictor


def file_digest(path: str | Path) -> tuple[str | None, int, str | None]:
    """(sha256, size in bytes, format by content) of a regular file; (None, 0, None) for
    anything else. Streams (a huge file refused by size costs no memory) and never blocks
    on a named pipe (opened non-blocking, checked before the first read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None, 0, None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, pipe or device: nothing to hash
        os.close(fd)
        return None, 0, None
    with os.fdopen(fd, "rb") as handle:
        digest, size, head = hashlib.sha256(), 0, b""
        try:
            while chunk := handle.read(CHUNK):
                head = head or chunk[:SNIFF_BYTES]
                digest.update(chunk)
                size += len(chunk)
        except OSError:
            return None, 0, None
    return digest.hexdigest(), size, sniff_format(head)


def cli_event(
    path: str | Path, result: Prediction | Failure, predictor: Predictor
) -> PredictionEvent:
    """The event for one input of `covid-cxr predict`: channel "cli", nobody's key."""
    return _event(*file_digest(path), result, predictor)


def bytes_event(data: bytes, result: Prediction | Failure, predictor: Predictor) -> PredictionEvent:
    """The event for an input held in memory (`covid-cxr pacs`: an instance retrieved from the
    PACS), on the command-line channel like `predict`."""
    digest = hashlib.sha256(data).hexdigest()
    return _event(digest, len(data), sniff_format(data), result, predictor)


def _event(
    sha256: str | None,
    size: int,
    sniffed: str | None,
    result: Prediction | Failure,
    predictor: Predictor,
) -> PredictionEvent:
    from covid_cxr.inference.batch import Failure

    common = {
        "time": utc_now(),
        "request_id": new_request_id(),
        "channel": "cli",
        "who": None,
        "input_sha256": sha256,
        "input_bytes": size,
        "model_name": predictor.info.name,
        "model_version": predictor.version,
    }
    if isinstance(result, Failure):
        outcome = outcome_of(result.code)
        return PredictionEvent(**common, input_format=sniffed, outcome=outcome, reason=result.code)
    return PredictionEvent(
        **common,
        input_format=result.radiograph.format,
        outcome="predicted",
        probability=result.probability,
        threshold=result.threshold,
        label=result.label,
        latency_ms=result.timings_ms["total"],
    )


class CliTrail:
    """The audit trail of one `covid-cxr predict` run: `record` each input before its row."""

    def __init__(self, url: str, predictor: Predictor) -> None:
        from covid_cxr.audit.store import recorder_for

        self.recorder = recorder_for(url)
        self.predictor = predictor

    def record(self, path: str | Path, result: Prediction | Failure) -> None:
        self.recorder.record(cli_event(path, result, self.predictor))

    def close(self) -> None:
        self.recorder.close()
