"""What the served model is: the model card facts and the service's limits."""

from __future__ import annotations

from fastapi import APIRouter

from covid_cxr.service import schemas
from covid_cxr.service.dependencies import EngineDep, SettingsDep
from covid_cxr.service.openapi import ERRORS

router = APIRouter(prefix="/api/v1", tags=["model"])


@router.get(
    "/model", response_model=schemas.ModelCard, responses={401: ERRORS[401], 503: ERRORS[503]}
)
async def model_card(engine: EngineDep, settings: SettingsDep) -> schemas.ModelCard:
    """Model-card facts: what the model is, its operating point, metrics and limits."""
    return engine.model_card(api_key_required=settings.api_key is not None)
