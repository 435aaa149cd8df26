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

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from covid_cxr import __version__
from covid_cxr.service import handlers
from covid_cxr.service.dependencies import ServiceState, make_recorder
from covid_cxr.service.engine import Engine
from covid_cxr.service.openapi import DESCRIPTION, openapi_with_key, swagger_assets
from covid_cxr.service.pool import InferencePool
from covid_cxr.service.routers import health, model, page, predict
from covid_cxr.service.routers.page import STATIC
from covid_cxr.service.security import (
    ApiKeyGuard,
    HostGuard,
    LastResortErrors,
    RequestId,
    SecurityHeaders,
    allowed_hosts,
)
from covid_cxr.service.settings import ServiceSettings

log = logging.getLogger("covid_cxr.service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model in the background, so /healthz answers while it loads."""
    state: ServiceState = app.state.service
    loading = asyncio.get_running_loop().run_in_executor(None, Engine.load, state.settings)
    loading.add_done_callback(lambda future: _loaded(state, future))
    yield
    state.pool.shutdown()
    state.recorder.close()


def _loaded(state: ServiceState, future: asyncio.Future) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is None:
        state.engine = future.result()
        log.info("model %s ready", state.engine.version)
    else:
        state.load_error = str(exc)
        log.error("the model could not be loaded: %s", exc)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings.from_env()
    app = FastAPI(
        title="covid-cxr",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    pool = InferencePool(settings.inference_workers, settings.queue_size, settings.max_queue_wait_s)
    app.state.service = ServiceState(settings, pool, make_recorder(settings))
    for router in (health.router, model.router, predict.router, page.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs/assets", StaticFiles(directory=swagger_assets()), name="swagger")
    app.openapi = lambda: openapi_with_key(app)
    handlers.install(app)
    _add_middleware(app, settings)
    return app


def _add_middleware(app: FastAPI, settings: ServiceSettings) -> None:
    """Outermost last: security headers and request ids on every answer, then the Host check,
    CORS, the API key, and the last-resort 500 around the app itself."""
    app.add_middleware(LastResortErrors)
    app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type", "Prefer"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    names, any_ip = allowed_hosts(settings.host, settings.allowed_hosts)
    app.add_middleware(HostGuard, allowed=names, any_ip=any_ip)
    app.add_middleware(RequestId)
    app.add_middleware(SecurityHeaders)


def app_from_env() -> FastAPI:
    """The uvicorn factory: settings from COVID_CXR_* variables."""
    return create_app(ServiceSettings.from_env())
