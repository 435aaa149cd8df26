"""DICOM results of one prediction: a Structured Report and a Secondary Capture.

`build_results` makes both objects in memory; `write_results` files them atomically as
`<stem>.sr.dcm` and `<stem>.sc.dcm`. Callers: `covid-cxr predict --dicom-out`, the API's
`dicom=true` option, and STOW-RS back to a PACS.

For a DICOM input both objects join the input's study, each in a new series, with the patient
and study attributes copied from the input's header (absent ones stay empty: nothing is made
up) and the SR referencing the input by its Study, Series and SOP Instance UIDs. A PNG or JPEG
input has no study: the SC then opens a new study with an empty patient, and the SR reports on
that SC. Every UID is new. Both objects say ContentQualification RESEARCH, and the SC shows
"Research use only, not a medical device." burned into the image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from covid_cxr import RESEARCH_NOTICE, __version__
from covid_cxr.dicom.capture import with_banner
from covid_cxr.dicom.report import coding_scheme, measurement_report
from covid_cxr.errors import RadiographError
from covid_cxr.fileio import atomic_path

if TYPE_CHECKING:
    from covid_cxr.imaging import Radiograph
    from covid_cxr.inference.predictor import Prediction
    from covid_cxr.models.info import ModelInfo

MANUFACTURER = "covid-cxr"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
# Patient and study attributes copied from the input into both results (SOPClass keywords).
PATIENT_STUDY = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "referring_physician_name": "ReferringPhysicianName",
}
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
HEADER_EXTRAS = ("SpecificCharacterSet", "PatientOrientation")


class MissingUidError(RadiographError):
    """A DICOM input without the UIDs its results need to join its study (API: missing_uid)."""


@dataclass(frozen=True)
class DicomResults:
    """The two result objects (pydicom Datasets, highdicom subclasses) of one prediction."""

    sr: Dataset  # Comprehensive 3D SR, TID 1500 measurement report
    sc: Dataset  # Secondary Capture: Grad-CAM overlay under a research-use banner
    new_study: bool  # True when the input was not DICOM and both open a new study

    def sr_bytes(self) -> bytes:
        return to_bytes(self.sr)

    def sc_bytes(self) -> bytes:
        return to_bytes(self.sc)


def to_bytes(dataset: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble, file meta) in memory, e.g. for STOW-RS or base64."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def build_results(
    radiograph: Radiograph,
    prediction: Prediction,
    overlay_rgb: np.ndarray,
    model_info: ModelInfo,
    *,
    operating_point: str | None = None,
) -> DicomResults:
    """The SR and SC for `prediction` of `radiograph`.

    overlay_rgb: (H, W, 3) uint8, the Grad-CAM overlay (`covid_cxr.explain.gradcam.overlay`)
        or any RGB rendering of the radiograph to file as the SC.
    model_info: the model that predicted (name, version, thresholds).
    operating_point: the threshold's name when the caller chose one other than the model's
        default (`Predictor.operating_point`).

    Raises MissingUidError (a RadiographError) for a DICOM input whose header lacks the UIDs
    needed to file results in its study.
    """
    point = operating_point or model_info.operating_point
    source = _source_header(radiograph)
    verdict = "COVID-19 likely" if prediction.positive else "COVID-19 not likely"
    finding = (
        f"{verdict}: probability {prediction.probability:.3f}, "
        f"threshold {prediction.threshold:.3f} ({point})"
    )
    model = f"model {model_info.name} {model_info.version}"
    pixels = with_banner(overlay_rgb, [finding, model])
    sc = _secondary_capture(pixels, source, model_info)
    evidence = [sc] if source is None else [source, sc]
    report = measurement_report(
        reported_on=sc if source is None else source,
        probability=prediction.probability,
        threshold=prediction.threshold,
        positive=prediction.positive,
        operating_point=point,
        model_info=model_info,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="covid-cxr COVID-19 result (research use only)",
        coding_schemes=[coding_scheme()],
        **_common(model_info),
    )
    return DicomResults(sr=sr, sc=sc, new_study=source is None)


def result_files(folder: str | Path, stem: str) -> tuple[Path, Path]:
    """Where `write_results` puts the SR and the SC."""
    folder = Path(folder)
    return folder / f"{stem}.sr.dcm", folder / f"{stem}.sc.dcm"


def write_results(results: DicomResults, folder: str | Path, stem: str) -> tuple[Path, Path]:
    """Write `<stem>.sr.dcm` and `<stem>.sc.dcm` into `folder` (created if needed), each
    atomically: a file is either complete or absent. Returns (sr_path, sc_path)."""
    paths = result_files(folder, stem)
    for dataset, path in zip((results.sr, results.sc), paths, strict=True):
        with atomic_path(path) as tmp:
            dcmwrite(tmp, dataset, enforce_file_format=True)
    return paths


def _common(model_info: ModelInfo) -> dict[str, Any]:
    return {
        "content_qualification": "RESEARCH",
        "manufacturer_model_name": f"{model_info.name} {model_info.version}"[:64],
        "software_versions": f"covid-cxr {__version__}",
    }


def _source_header(radiograph: Radiograph) -> Dataset | None:
    """The input's UIDs and patient/study attributes, or None for a non-DICOM input."""
    header = radiograph.dataset
    if header is None:
        return None
    missing = [k for k in SOURCE_UIDS if not str(header.get(k, "") or "").strip()]
    if missing:
        raise MissingUidError(
            radiograph.source,
            f"the DICOM header has no {', '.join(missing)}, so results cannot be filed in its "
            "study",
            "export the image from the PACS again (it should carry its UIDs), or convert it to "
            "PNG to get results in a new study",
        )
    source = Dataset()
    for keyword in (*SOURCE_UIDS, *PATIENT_STUDY.values(), *HEADER_EXTRAS):
        if keyword in header:
            source[keyword] = header[keyword]
    for keyword in PATIENT_STUDY.values():  # type 2: present, possibly empty
        if keyword not in source:
            setattr(source, keyword, None)
    return source


def _secondary_capture(
    pixels: np.ndarray, source: Dataset | None, model_info: ModelInfo
) -> hd.sc.SCImage:
    patient_study = {}
    if source is not None:
        patient_study = {arg: source.get(k) or None for arg, k in PATIENT_STUDY.items()}
    orientation = _orientation(source)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=hd.UID() if source is None else source.StudyInstanceUID,
        series_instance_uid=hd.UID(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # highdicom requires an orientation in the PATIENT system; cleared below when unknown.
        patient_orientation=orientation or ("L", "F"),
        series_description="covid-cxr Grad-CAM overlay (research use only)",
        **patient_study,
        **_common(model_info),
    )
    if orientation is None:
        sc.PatientOrientation = None  # type 2: empty rather than a guess
    if source is not None and "SpecificCharacterSet" in source:
        sc.SpecificCharacterSet = source.SpecificCharacterSet
    sc.ConversionType = "WSD"  # made by a workstation (software), not digitised film or video
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = RESEARCH_NOTICE
    sc.DerivationDescription = (
        f"Grad-CAM heat map of {model_info.name} {model_info.version} blended over the "
        "radiograph, below a burned-in banner with the result"
    )
    if source is not None:
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = [reference]
    return sc


def _orientation(source: Dataset | None) -> tuple[str, str] | None:
    values = list(source.get("PatientOrientation") or []) if source is not None else []
    if len(values) == 2 and all(str(v).strip() for v in values):
        return str(values[0]), str(values[1])
    return None
