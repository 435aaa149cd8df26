"""One study's round trip: find its radiographs, predict each, store SR + SC back in the study.

Images travel in memory only (WADO-RS bytes -> `read_radiograph`); nothing is written to disk.
Only CR and DX series are retrieved; the Predictor's own checks (and the input gate, which
refuses lateral views and other modalities from the DICOM header) decide what is predicted.
A study that already holds a covid-cxr result series is not processed again, so a restart
after a crash between storing and remembering never stores results twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from covid_cxr.audit.capture import bytes_event
from covid_cxr.errors import OutOfScopeError, RadiographError, error_code, failure_reason
from covid_cxr.imaging import read_radiograph
from covid_cxr.imaging.preprocess import grey_to_uint8
from covid_cxr.inference.batch import Failure
from covid_cxr.pacs.dicomweb import DicomWebClient

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from covid_cxr.audit.events import Recorder
    from covid_cxr.inference.predictor import Prediction, Predictor

RADIOGRAPH_MODALITIES = ("CR", "DX")
RESULT_SERIES_PREFIX = "covid-cxr"  # the SR's and SC's SeriesDescription start with this


@dataclass(frozen=True)
class InstanceResult:
    sop_instance_uid: str
    outcome: Literal["predicted", "refused", "failed"]
    probability: float | None = None
    label: str | None = None
    reason: str | None = None


@dataclass
class StudyResult:
    study_uid: str
    instances: list[InstanceResult] = field(default_factory=list)
    stored: int = 0  # result objects stored back (2 per predicted instance)
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was done, e.g. results already present

    @property
    def predicted(self) -> int:
        return sum(i.outcome == "predicted" for i in self.instances)


def _value(dataset: Dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "")


def has_results(client: DicomWebClient, study_uid: str) -> bool:
    """Whether the study already holds a covid-cxr SR or SC series."""
    series = client.search_series(study_uid, includefield="SeriesDescription")
    return any(_value(s, "SeriesDescription").startswith(RESULT_SERIES_PREFIX) for s in series)


def process_study(
    client: DicomWebClient,
    predictor: Predictor,
    study_uid: str,
    recorder: Recorder | None = None,
) -> StudyResult:
    """Predict every CR/DX instance of the study and store its SR and SC in the study.

    With a `recorder`, each instance's prediction (or failure) enters the audit trail before
    its results go to the PACS."""
    start = time.perf_counter()
    result = StudyResult(study_uid)
    if has_results(client, study_uid):
        result.skipped = "the study already holds covid-cxr results"
        return result
    for series in client.search_series(study_uid, includefield="Modality"):
        if _value(series, "Modality") not in RADIOGRAPH_MODALITIES:
            continue
        series_uid = _value(series, "SeriesInstanceUID")
        for instance in client.search_instances(study_uid, series_uid):
            sop_uid = _value(instance, "SOPInstanceUID")
            data = client.retrieve_instance(study_uid, series_uid, sop_uid)
            outcome, files, audited = _predict(predictor, data, f"{study_uid}/{sop_uid}", sop_uid)
            if recorder is not None:
                recorder.record(bytes_event(data, audited, predictor))
            if files:
                client.store(files)
                result.stored += len(files)
            result.instances.append(outcome)
    result.seconds = time.perf_counter() - start
    return result


def _predict(
    predictor: Predictor, data: bytes, name: str, sop_uid: str
) -> tuple[InstanceResult, list[bytes], Prediction | Failure]:
    """The instance's outcome, the result files to store (none when it failed) and what the
    audit trail records."""
    from covid_cxr.dicom import build_results

    try:
        radiograph = read_radiograph(data, name=name)
        prediction = predictor.predict(radiograph, cam=predictor.cam_available)
        rgb = _picture(predictor, radiograph.pixels, prediction.cam, prediction.box)
        results = build_results(
            radiograph, prediction, rgb, predictor.info, operating_point=predictor.operating_point
        )
    except RadiographError as exc:
        kind = "refused" if isinstance(exc, OutOfScopeError) else "failed"
        reason = exc.reason if kind == "refused" else failure_reason(exc)
        failure = Failure(name, failure_reason(exc), error_code(exc))
        return InstanceResult(sop_uid, kind, reason=reason), [], failure
    outcome = InstanceResult(sop_uid, "predicted", prediction.probability, prediction.label)
    return outcome, [results.sr_bytes(), results.sc_bytes()], prediction


def _picture(
    predictor: Predictor,
    pixels: np.ndarray,
    cam: np.ndarray | None,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """What the Secondary Capture shows: the Grad-CAM overlay (placed on `box`, the region the
    model saw), or the plain radiograph when the model cannot explain itself."""
    from covid_cxr.explain.gradcam import overlay

    if cam is not None:
        return overlay(pixels, cam, crop=predictor.info.preprocess.crop, box=box)
    return np.repeat(grey_to_uint8(pixels)[:, :, None], 3, axis=2)
