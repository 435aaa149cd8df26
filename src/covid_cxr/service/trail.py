"""The audit trail of the prediction routes: one `PredictionEvent` per uploaded file.

Runs in the inference pool's thread together with the prediction, because a recorder may
block (a database commit): the answer leaves only after `record` has returned. An event holds
the input's sha256, format and size, never its pixels, its file name or any DICOM attribute.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from covid_cxr.audit.events import PredictionEvent, Recorder, outcome_of, utc_now
from covid_cxr.errors import RadiographError
from covid_cxr.service import schemas
from covid_cxr.service.responses import ApiError, radiograph_error
from covid_cxr.service.security import FORMATS
from covid_cxr.service.uploads import UploadedFile

log = logging.getLogger("covid_cxr.service")

INTERNAL_ERROR = schemas.ErrorBody(code="internal_error", message="the server failed on this file")


class Analyser(Protocol):
    """What the routes need of an engine (the real `Engine`, or a test's stand-in)."""

    name: str
    version: str

    def analyse(
        self, upload: UploadedFile, cam: bool, preview: bool, dicom: bool = False
    ) -> schemas.Prediction: ...


@dataclass(frozen=True)
class RequestContext:
    """Who asked and when, for the trail: a request id (also the X-Request-ID header) and the
    API key's id (`key_id`), never the key."""

    request_id: str
    who: str | None
    started: float  # time.perf_counter() when the request arrived


def key_id(key: str) -> str:
    """A stable, non-reversible name for an API key: the first 12 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _input_format(data: bytes) -> str | None:
    from covid_cxr.imaging.read import sniff_format

    kind = sniff_format(data)
    return kind if kind in FORMATS else None


def error_of(exc: Exception) -> tuple[int, schemas.ErrorBody]:
    """The status and body a failure on one file is reported with."""
    if isinstance(exc, RadiographError):
        return radiograph_error(exc)
    if isinstance(exc, ApiError):
        return exc.status, exc.body
    # The type only: messages can carry image content or DICOM fields.
    log.error("internal error %s on an uploaded file", type(exc).__name__)
    return 500, INTERNAL_ERROR


class Trail:
    """Predictions that leave an event each, bound to one request."""

    def __init__(self, engine: Analyser, recorder: Recorder, context: RequestContext) -> None:
        self.engine = engine
        self.recorder = recorder
        self.context = context

    def predict(
        self, upload: UploadedFile, cam: bool, preview: bool, dicom: bool = False
    ) -> schemas.Prediction:
        """One file: its prediction, or its error raised after the event is recorded."""
        try:
            result = self.engine.analyse(upload, cam, preview, dicom)
        except Exception as exc:
            self.record(upload, None, error_of(exc)[1])
            raise
        self.record(upload, result, None)
        return result

    def predict_batch(
        self, uploads: list[UploadedFile], cam: bool, preview: bool, dicom: bool = False
    ) -> schemas.BatchResponse:
        """Each file on its own: a bad one gets its error, the others their results."""
        items = []
        for index, upload in enumerate(uploads):
            item = schemas.BatchItem(index=index, filename=upload.filename, status=200)
            try:
                item.result = self.engine.analyse(upload, cam, preview, dicom)
            except Exception as exc:
                item.status, item.error = error_of(exc)
            self.record(upload, item.result, item.error)
            items.append(item)
        failed = sum(item.error is not None for item in items)
        return schemas.BatchResponse(count=len(items), failed=failed, results=items)

    def record(
        self,
        upload: UploadedFile,
        result: schemas.Prediction | None,
        error: schemas.ErrorBody | None,
    ) -> None:
        """One event; an upload over the size limit was never kept, so it has no sha256."""
        code = error.code if error else None
        outcome = outcome_of(code)
        self.recorder.record(
            PredictionEvent(
                time=utc_now(),
                request_id=self.context.request_id,
                channel="api",
                who=self.context.who,
                input_sha256=None if upload.too_large else hashlib.sha256(upload.data).hexdigest(),
                input_format=result.format if result else _input_format(upload.data),
                input_bytes=upload.size,
                model_name=self.engine.name,
                model_version=self.engine.version,
                outcome=outcome,
                reason=code,
                probability=result.probability if result else None,
                threshold=result.threshold if result else None,
                label=result.label if result else None,
                latency_ms=round((time.perf_counter() - self.context.started) * 1000.0, 2),
            )
        )
