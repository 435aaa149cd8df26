"""Every failure the API reports, as one JSON shape: {"error": {"code", "message", "hint"}}.

Status codes, chosen once for the whole API:
  400 the request itself is malformed (no `file` field, broken multipart, too many files)
  401 missing or wrong X-API-Key
  408 the upload was too slow to arrive
  413 the bytes are too many (a file above max_upload_mb, a batch above max_batch_mb)
  415 the bytes are not a PNG, JPEG or DICOM file (by content, whatever the name says),
      or the request is not multipart/form-data
  422 it is such a file but unusable: empty, truncated or corrupt, no pixel data, an
      unsupported variant, too many pixels (decompression-bomb guard) or too small
  503 the model is not loaded yet, too many predictions are waiting (retry later), or the
      prediction could not be recorded in the audit trail (`audit_unavailable`)
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from covid_cxr.errors import NotAnImageError, RadiographError, error_code
from covid_cxr.service.schemas import ErrorBody, ErrorResponse


class ApiError(Exception):
    """A failure meant for the client; rendered by the app's exception handler."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(code=code, message=message, hint=hint)
        self.headers = headers or {}


def error_response(
    status: int, body: ErrorBody, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status, headers=headers)


def radiograph_error(exc: RadiographError) -> tuple[int, ErrorBody]:
    """The status and body for a file that could not be read as a radiograph."""
    status = 415 if isinstance(exc, NotAnImageError) else 422
    message = f"{exc.source}: {exc.reason}" if exc.source else exc.reason
    return status, ErrorBody(code=error_code(exc), message=message, hint=exc.hint)
