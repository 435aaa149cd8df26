"""Every exception the routes raise, turned into the API's one error shape, in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from covid_cxr.audit.store import AuditError
from covid_cxr.errors import RadiographError
from covid_cxr.service.responses import ApiError, error_response, radiograph_error
from covid_cxr.service.schemas import ErrorBody

log = logging.getLogger("covid_cxr.service")

HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
}


async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.body, exc.headers)


async def bad_radiograph(_request: Request, exc: RadiographError) -> JSONResponse:
    return error_response(*radiograph_error(exc))


async def audit_unavailable(_request: Request, exc: AuditError) -> JSONResponse:
    """A prediction that could not be recorded is not returned."""
    log.error("audit trail unavailable: %s", exc)
    body = ErrorBody(
        code="audit_unavailable",
        message="the prediction could not be recorded in the audit trail, so it is withheld",
        hint="retry shortly; the server's log names the cause",
    )
    return error_response(503, body, {"Retry-After": "5"})


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    body = ErrorBody(code=code, message=str(exc.detail))
    return error_response(exc.status_code, body, getattr(exc, "headers", None))


async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    )
    body = ErrorBody(code="invalid_request", message=problems, hint="see /docs")
    return error_response(422, body)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RadiographError, bad_radiograph)
    app.add_exception_handler(AuditError, audit_unavailable)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
