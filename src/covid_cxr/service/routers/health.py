"""Liveness and readiness: for load balancers and orchestrators (no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter

from covid_cxr.service import schemas
from covid_cxr.service.dependencies import EngineDep
from covid_cxr.service.openapi import ERRORS

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    """The process is up and its event loop answers (says nothing about the model)."""
    return schemas.Health()


@router.get("/readyz", response_model=schemas.Readiness, responses={503: ERRORS[503]})
async def readyz(engine: EngineDep) -> schemas.Readiness:
    """The model is loaded and predictions can be served."""
    return schemas.Readiness(model_version=engine.version)
