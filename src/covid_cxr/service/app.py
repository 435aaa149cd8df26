"""The FastAPI application: the versioned API, the web page, health checks and offline docs.

`create_app(settings)` builds it; `app_from_env()` is what uvicorn imports in each worker
process (the CLI passes settings through COVID_CXR_* variables). The model loads in the
background at start-up: /healthz answers at once, /readyz once the model is in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from covid_cxr import RESEARCH_NOTICE, __version__
from covid_cxr.errors import RadiographError
from covid_cxr.service import schemas
from covid_cxr.service.engine import Engine
from covid_cxr.service.pool import InferencePool
from covid_cxr.service.responses import ApiError, error_response, radiograph_error
from covid_cxr.service.security import ApiKeyGuard, LastResortErrors, SecurityHeaders
from covid_cxr.service.settings import FALSE_WORDS, TRUE_WORDS, ServiceSettings
from covid_cxr.service.uploads import UploadedFile, read_form

log = logging.getLogger("covid_cxr.service")

STATIC = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small flag fields
FLAG_FIELDS = ("cam", "preview")
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
}

API_DESCRIPTION = f"""COVID-19 detection on chest X-rays. **{RESEARCH_NOTICE}**

Upload a PNG, JPEG or DICOM as multipart field `file`; the format is judged by the bytes,
never by the file name or declared type. Uploads stay in memory and are never stored or logged.

* `cam=true` adds the Grad-CAM heat map blended onto the radiograph, as a base64 PNG at the
  radiograph's own size, scaled down to at most 1024 px on the longest side (the server's
  `image_max_side`) to keep responses small.
* `preview=true` adds the radiograph as the server decoded it (for DICOM, which browsers
  cannot show).
* When the server has an API key, every `/api/` call needs header `X-API-Key` (the web page
  asks for it); the page, `/docs`, `/healthz` and `/readyz` stay open.
* Errors are `{{"error": {{"code", "message", "hint"}}}}`: 400 malformed request, 401 API key,
  408 upload too slow, 413 too many bytes, 415 not a PNG/JPEG/DICOM, 422 such a file but
  unusable (empty, corrupt, no pixels, too many pixels, too small), 503 not ready or busy.
"""

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": text}
    for status, text in {
        400: "malformed request (no file, broken multipart, too many files)",
        401: "missing or wrong X-API-Key (only when the server has a key)",
        408: "upload too slow",
        413: "file or request body larger than the server's limit",
        415: "not a PNG, JPEG or DICOM file (judged by content), or not multipart/form-data",
        422: "a PNG, JPEG or DICOM that cannot be used (empty, corrupt, no pixels, too large)",
        503: "model not loaded yet, or too busy (retry after the Retry-After seconds)",
    }.items()
}


def _upload_body(batch: bool) -> dict[str, Any]:
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


def _flag(form_fields: dict[str, str], name: str) -> bool:
    value = form_fields.get(name, "").strip().lower()
    if value in FALSE_WORDS or not value:
        return False
    if value in TRUE_WORDS:
        return True
    raise ApiError(400, "bad_request", f"form field {name!r} must be true or false, got {value!r}")


CAM_QUERY = Query(False, description="also return the Grad-CAM heat map over the radiograph")
PREVIEW_QUERY = Query(
    False, description="also return the radiograph as decoded (browsers cannot show DICOM)"
)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = InferencePool(settings.inference_workers, settings.queue_size)
        loading = asyncio.get_running_loop().run_in_executor(None, Engine.load, settings)
        loading.add_done_callback(lambda future: _loaded(app, future))
        yield
        app.state.pool.shutdown()

    app = FastAPI(
        title="covid-cxr",
        version=__version__,
        description=API_DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.engine = None
    app.state.load_error = None

    def engine() -> Engine:
        if app.state.engine is None:
            message = (
                f"the model failed to load: {app.state.load_error}"
                if app.state.load_error
                else "the model is still loading"
            )
            raise ApiError(503, "not_ready", message, "retry shortly", {"Retry-After": "2"})
        return app.state.engine

    def pool() -> InferencePool:
        return app.state.pool

    async def predict_form(
        request: Request, max_body: int, max_files: int, cam: bool, preview: bool
    ) -> tuple[list[UploadedFile], bool, bool]:
        """The uploaded files, and the cam/preview flags from the query or the form."""
        pool().check()
        form = await read_form(
            request,
            max_body=max_body,
            max_file=settings.max_upload_bytes,
            max_files=max_files,
            timeout_s=settings.upload_timeout_s,
            known_fields=FLAG_FIELDS,
        )
        cam = cam or _flag(form.fields, "cam")
        preview = preview or _flag(form.fields, "preview")
        return form.files, cam, preview

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Any:
        return error_response(exc.status, exc.body, exc.headers)

    @app.exception_handler(RadiographError)
    async def bad_radiograph(_request: Request, exc: RadiographError) -> Any:
        return error_response(*radiograph_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Any:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        body = schemas.ErrorBody(code=code, message=str(exc.detail))
        return error_response(exc.status_code, body, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> Any:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        body = schemas.ErrorBody(code="invalid_request", message=problems, hint="see /docs")
        return error_response(422, body)

    @app.get("/healthz", response_model=schemas.Health, tags=["health"])
    async def healthz() -> schemas.Health:
        """The process is up and its event loop answers (says nothing about the model)."""
        return schemas.Health()

    @app.get(
        "/readyz",
        response_model=schemas.Readiness,
        responses={503: ERRORS[503]},
        tags=["health"],
    )
    async def readyz() -> schemas.Readiness:
        """The model is loaded and predictions can be served."""
        return schemas.Readiness(model_version=engine().version)

    @app.get(
        "/api/v1/model",
        response_model=schemas.ModelCard,
        responses={401: ERRORS[401], 503: ERRORS[503]},
        tags=["model"],
    )
    async def model_card() -> schemas.ModelCard:
        """Model-card facts: what the model is, its operating point, metrics and limits."""
        return engine().model_card(api_key_required=settings.api_key is not None)

    @app.post(
        "/api/v1/predict",
        response_model=schemas.Prediction,
        responses=ERRORS,
        openapi_extra=_upload_body(batch=False),
        tags=["predict"],
    )
    async def predict(
        request: Request, cam: bool = CAM_QUERY, preview: bool = PREVIEW_QUERY
    ) -> schemas.Prediction:
        """Probability of COVID-19 for one radiograph (PNG, JPEG or DICOM) in field `file`."""
        model = engine()
        files, cam, preview = await predict_form(
            request, settings.max_upload_bytes + FORM_OVERHEAD, 1, cam, preview
        )
        return await pool().run(model.analyse, files[0], cam, preview)

    @app.post(
        "/api/v1/predict/batch",
        response_model=schemas.BatchResponse,
        responses=ERRORS,
        openapi_extra=_upload_body(batch=True),
        tags=["predict"],
    )
    async def predict_batch(
        request: Request, cam: bool = CAM_QUERY, preview: bool = PREVIEW_QUERY
    ) -> schemas.BatchResponse:
        """Several radiographs (fields `files`, at most max_batch_files): one result or one
        error per file, in upload order; a bad file never fails the others."""
        model = engine()
        files, cam, preview = await predict_form(
            request, settings.max_batch_bytes, settings.max_batch_files, cam, preview
        )
        return await pool().run(model.analyse_batch, files, cam, preview)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs/assets", StaticFiles(directory=_swagger_assets()), name="swagger")

    app.openapi = lambda: _openapi_with_key(app)
    app.add_middleware(LastResortErrors)
    app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(SecurityHeaders)
    return app


def _loaded(app: FastAPI, future: asyncio.Future) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is None:
        app.state.engine = future.result()
        log.info("model %s ready", app.state.engine.version)
    else:
        app.state.load_error = str(exc)
        log.error("the model could not be loaded: %s", exc)


def _openapi_with_key(app: FastAPI) -> dict[str, Any]:
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


def _swagger_assets() -> Path:
    """Swagger UI's files from the swagger-ui-bundle wheel, so /docs needs no CDN."""
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


def app_from_env() -> FastAPI:
    """The uvicorn factory: settings from COVID_CXR_* variables."""
    return create_app(ServiceSettings.from_env())
