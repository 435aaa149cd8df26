"""What the routes depend on, as FastAPI dependencies: the settings, the engine, the pool, the
audit recorder and the request's context. Tests swap any of them with
`app.dependency_overrides[get_engine] = ...`; the service keeps them in `ServiceState`.

They are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker
thread, a thread hand-off per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from covid_cxr.audit.events import Recorder
from covid_cxr.audit.store import recorder_for
from covid_cxr.service.engine import Engine
from covid_cxr.service.pool import InferencePool
from covid_cxr.service.responses import ApiError
from covid_cxr.service.settings import ServiceSettings
from covid_cxr.service.trail import Analyser, RequestContext, Trail, key_id

PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class ServiceState:
    """One app's live parts; the engine arrives when the model has loaded."""

    settings: ServiceSettings
    pool: InferencePool
    recorder: Recorder
    engine: Engine | None = None
    load_error: str | None = None


def make_recorder(settings: ServiceSettings) -> Recorder:
    """The audit trail's store for these settings: `audit_db`, else the default SQLite file."""
    return recorder_for(settings.audit_db)


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> ServiceSettings:
    return state.settings


async def get_engine(state: StateDep) -> Analyser:
    """The loaded model, or 503 while it loads (or after it failed to)."""
    if state.engine is None:
        message = (
            f"the model failed to load: {state.load_error}"
            if state.load_error
            else "the model is still loading"
        )
        raise ApiError(503, "not_ready", message, "retry shortly", {"Retry-After": "2"})
    return state.engine


async def get_pool(state: StateDep) -> InferencePool:
    return state.pool


async def get_recorder(state: StateDep) -> Recorder:
    return state.recorder


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
EngineDep = Annotated[Analyser, Depends(get_engine)]
PoolDep = Annotated[InferencePool, Depends(get_pool)]
RecorderDep = Annotated[Recorder, Depends(get_recorder)]


async def get_context(request: Request, settings: SettingsDep) -> RequestContext:
    """The request's id (set by the RequestId middleware) and its API key's id."""
    key = request.headers.get("x-api-key") if settings.api_key else None
    return RequestContext(
        request_id=getattr(request.state, "request_id", ""),
        who=key_id(key) if key else None,
        started=time.perf_counter(),
    )


ContextDep = Annotated[RequestContext, Depends(get_context)]


async def get_trail(engine: EngineDep, recorder: RecorderDep, context: ContextDep) -> Trail:
    return Trail(engine, recorder, context)


async def client_wait(
    request: Request,
    settings: SettingsDep,
    wait: Annotated[
        float | None,
        Query(ge=0, description="seconds to wait for a place when busy, instead of a 503"),
    ] = None,
) -> float:
    """How long the client will wait for a place: query `wait` or header `Prefer: wait=N`
    (RFC 7240), capped by the server's max_client_wait_s; 0 means answer 503 at once."""
    if wait is None:
        found = PREFER_WAIT.search(request.headers.get("prefer", ""))
        wait = float(found.group(1)) if found else 0.0
    return min(wait, settings.max_client_wait_s)


TrailDep = Annotated[Trail, Depends(get_trail)]
WaitDep = Annotated[float, Depends(client_wait)]
