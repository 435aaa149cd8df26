"""The API's typed requests and responses: what /docs shows and what clients can rely on."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from covid_cxr import RESEARCH_NOTICE


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. 'corrupt_image'")
    message: str = Field(description="what is wrong, for people")
    hint: str = Field("", description="what to do about it")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ImagePNG(BaseModel):
    """A PNG for display, at the radiograph's own size unless its longest side is larger than
    the server's `image_max_side` (default 1024), in which case it is scaled down to that."""

    png_base64: str
    width: int
    height: int


class DicomResults(BaseModel):
    """The prediction as DICOM objects (`dicom=true`), each a base64 DICOM Part 10 file."""

    sr_base64: str = Field(description="Comprehensive 3D SR, TID 1500 measurement report")
    sc_base64: str = Field(description="Secondary Capture: Grad-CAM overlay under a banner")
    study_instance_uid: str = Field(description="the input's study, or the new one for PNG/JPEG")
    sr_sop_instance_uid: str
    sc_sop_instance_uid: str
    new_study: bool = Field(description="true when the upload was not DICOM")


class Prediction(BaseModel):
    filename: str | None = Field(None, description="the uploaded file's name, as sent")
    probability: float = Field(ge=0.0, le=1.0, description="model probability of COVID-19")
    label: Literal["COVID-19", "non-COVID"]
    positive: bool = Field(description="probability >= threshold")
    threshold: float
    operating_point: str
    model_version: str
    format: str = Field(description="image format found in the bytes: PNG, JPEG or DICOM")
    width: int
    height: int
    timings_ms: dict[str, float]
    warnings: list[str] = Field(
        default_factory=list,
        description="notes on the result, e.g. a patient age outside the ages seen in training",
    )
    cam: ImagePNG | None = Field(
        None, description="Grad-CAM heat map blended onto the radiograph (when cam=true)"
    )
    preview: ImagePNG | None = Field(
        None, description="the radiograph as the server decoded it (when preview=true)"
    )
    dicom: DicomResults | None = Field(
        None, description="the result as DICOM SR and Secondary Capture (when dicom=true)"
    )
    notice: str = RESEARCH_NOTICE


class BatchItem(BaseModel):
    """One file of a batch: `result` when it could be read, else `error` and its `status`."""

    index: int
    filename: str | None
    status: int = Field(description="the HTTP status a single /predict would have answered")
    result: Prediction | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    count: int
    failed: int
    results: list[BatchItem]
    notice: str = RESEARCH_NOTICE


class ServiceLimits(BaseModel):
    max_upload_bytes: int
    max_batch_files: int
    max_batch_bytes: int
    max_pixels: int
    formats: list[str]
    api_key_required: bool


class ModelCard(BaseModel):
    name: str = Field(description="architecture in the model registry")
    version: str
    runtime: str
    threshold: float
    operating_point: str
    cam_available: bool = Field(description="whether predictions can carry a Grad-CAM map")
    thresholds: dict[str, float]
    preprocess: dict[str, Any]
    metrics: dict[str, float] = Field(
        description="evaluation figures stored with the model (validation split)"
    )
    model_card: str | None = Field(
        None, description="where the full results are documented (shipped models)"
    )
    metadata: dict[str, Any]
    intended_use: str
    limitations: list[str]
    notice: str = RESEARCH_NOTICE
    service: ServiceLimits


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    model_version: str
