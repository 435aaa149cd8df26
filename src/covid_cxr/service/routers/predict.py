"""Predictions: one radiograph, or a batch with one result or error per file.

Each request holds a place in the pool from the start of its upload to its answer; the files
are read into memory, analysed in a worker thread, and each leaves an audit event there
before the answer is sent.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from covid_cxr.service import schemas
from covid_cxr.service.dependencies import PoolDep, SettingsDep, TrailDep, WaitDep
from covid_cxr.service.openapi import ERRORS, FLAG_FIELDS, upload_body
from covid_cxr.service.responses import ApiError
from covid_cxr.service.settings import FALSE_WORDS, TRUE_WORDS, ServiceSettings
from covid_cxr.service.uploads import Form, UploadLimits, read_form

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small flag fields

router = APIRouter(prefix="/api/v1/predict", tags=["predict"])

Cam = Annotated[bool, Query(description="also return the Grad-CAM heat map over the radiograph")]
Preview = Annotated[
    bool, Query(description="also return the radiograph as decoded (browsers cannot show DICOM)")
]
Dicom = Annotated[
    bool,
    Query(description="also return the result as DICOM SR and Secondary Capture (base64 files)"),
]


def _flag(form: Form, name: str, query: bool) -> bool:
    """A flag set by the query or by the form field of the same name."""
    value = form.fields.get(name, "").strip().lower()
    if query or value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS or not value:
        return False
    raise ApiError(400, "bad_request", f"form field {name!r} must be true or false, got {value!r}")


def _limits(settings: ServiceSettings, batch: bool) -> UploadLimits:
    return UploadLimits(
        max_body=settings.max_batch_bytes if batch else settings.max_upload_bytes + FORM_OVERHEAD,
        max_file=settings.max_upload_bytes,
        max_files=settings.max_batch_files if batch else 1,
        timeout_s=settings.upload_timeout_s,
        min_rate=settings.min_upload_kbps * 1024,
    )


@router.post(
    "",
    response_model=schemas.Prediction,
    responses=ERRORS,
    openapi_extra=upload_body(batch=False),
)
async def predict(
    request: Request,
    settings: SettingsDep,
    pool: PoolDep,
    trail: TrailDep,
    wait: WaitDep,
    cam: Cam = False,
    preview: Preview = False,
    dicom: Dicom = False,
) -> schemas.Prediction:
    """Probability of COVID-19 for one radiograph (PNG, JPEG or DICOM) in field `file`."""
    async with pool.admit(wait):
        form = await read_form(request, _limits(settings, batch=False), FLAG_FIELDS)
        cam, preview = _flag(form, "cam", cam), _flag(form, "preview", preview)
        dicom = _flag(form, "dicom", dicom)
        return await pool.run(trail.predict, form.files[0], cam, preview, dicom)


@router.post(
    "/batch",
    response_model=schemas.BatchResponse,
    responses=ERRORS,
    openapi_extra=upload_body(batch=True),
)
async def predict_batch(
    request: Request,
    settings: SettingsDep,
    pool: PoolDep,
    trail: TrailDep,
    wait: WaitDep,
    cam: Cam = False,
    preview: Preview = False,
    dicom: Dicom = False,
) -> schemas.BatchResponse:
    """Several radiographs (fields `files`, at most max_batch_files): one result or one
    error per file, in upload order; a bad file never fails the others."""
    async with pool.admit(wait):
        form = await read_form(request, _limits(settings, batch=True), FLAG_FIELDS)
        cam, preview = _flag(form, "cam", cam), _flag(form, "preview", preview)
        dicom = _flag(form, "dicom", dicom)
        return await pool.run(
            trail.predict_batch, form.files, cam, preview, dicom, files=len(form.files)
        )
