"""What /docs and /openapi.json say: the description, the error table, the upload bodies
(which the routes parse themselves) and the X-API-Key scheme."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.service import schemas

FLAG_FIELDS = ("cam", "preview", "dicom")

DESCRIPTION = f"""COVID-19 detection on chest X-rays. **{RESEARCH_NOTICE}**

Upload a PNG, JPEG or DICOM as multipart field `file`; the format is judged by the bytes,
never by the file name or declared type. Uploads stay in memory and are never stored or logged.

* `cam=true` adds the Grad-CAM heat map blended onto the radiograph, as a base64 PNG at the
  radiograph's own size, scaled down to at most 1024 px on the longest side (the server's
  `image_max_side`) to keep responses small.
* `preview=true` adds the radiograph as the server decoded it (for DICOM, which browsers
  cannot show).
* `dicom=true` adds DICOM results as base64 Part 10 files: a Structured Report (TID 1500: the
  finding, probability, threshold, operating point, model, research notice, a reference to
  the input) and a Secondary Capture of the Grad-CAM overlay (at the `cam` size) under a
  burned-in "Research use only" banner. For a DICOM upload both join its study, with its
  patient and study attributes; for PNG/JPEG they open a new study with an empty patient.
* When the server has an API key, every `/api/` call needs header `X-API-Key` (the web page
  asks for it); the page, `/docs`, `/healthz` and `/readyz` stay open.
* When the server is busy it answers 503 with `Retry-After`; a client that would rather wait
  sends header `Prefer: wait=N` (or query `wait=N`) and is held up to N seconds (at most the
  server's `max_client_wait_s`) for a place.
* Every answer carries an `X-Request-ID`, the id of the request in the server's audit trail.
* Errors are `{{"error": {{"code", "message", "hint"}}}}`: 400 malformed request or unknown
  Host, 401 API key, 408 upload too slow, 413 too many bytes, 415 not a PNG/JPEG/DICOM, 422
  such a file but unusable (empty, corrupt, no pixels, too many pixels, too small), 429 too
  many wrong API keys, 503 not ready, busy, or the audit trail cannot record (no result
  leaves unrecorded).
"""

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": text}
    for status, text in {
        400: "malformed request (no file, broken multipart, too many files)",
        401: "missing or wrong X-API-Key (only when the server has a key)",
        408: "upload stalled or too slow",
        413: "file or request body larger than the server's limit",
        415: "not a PNG, JPEG or DICOM file (judged by content), or not multipart/form-data",
        422: "a PNG, JPEG or DICOM that cannot be used (empty, corrupt, no pixels, too large)",
        429: "too many wrong API keys from this address (retry after the Retry-After seconds)",
        503: "model not loaded yet, too busy, or the audit trail cannot record "
        "(retry after the Retry-After seconds)",
    }.items()
}


def upload_body(batch: bool) -> dict[str, Any]:
    """OpenAPI for the multipart body, which the endpoints parse themselves (in memory)."""
    file_schema = {"type": "string", "format": "binary"}
    field = {"files": {"type": "array", "items": file_schema}} if batch else {"file": file_schema}
    flags = {
        name: {"type": "boolean", "description": "same as the query parameter"}
        for name in FLAG_FIELDS
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {**field, **flags},
                        "required": [next(iter(field))],
                    }
                }
            },
        }
    }


def openapi_with_key(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the X-API-Key scheme, so /docs can send the key."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
        for path, operations in schema["paths"].items():
            if path.startswith("/api/"):
                for operation in operations.values():
                    operation["security"] = [{"ApiKey": []}, {}]
        app.openapi_schema = schema
    return app.openapi_schema


def swagger_assets() -> Path:
    """Swagger UI's files from the swagger-ui-bundle wheel, so /docs needs no CDN."""
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)
