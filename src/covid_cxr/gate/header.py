"""The DICOM half of the input gate: what the header says about the image, checked before its
pixels are judged.

Refused: a modality other than CR/DX (CT, MR, US, NM, OT, ...), a lateral or other non-frontal
ViewPosition, a BodyPartExamined other than CHEST. Missing attributes are not refusals (many
exports strip them); the image classifier still judges the pixels. An age outside the ages seen
in training is a warning beside the result, not a refusal.

Ages in training: ieee8023 `age` 12 to 94 years, Kaggle pediatric set 1 to 5 years (per its
publisher); NIH, Hannover, JSRT and OpenIST images carry no age here. So the model has seen
1 to 94 years.
"""

from __future__ import annotations

import re
from typing import Any

from covid_cxr.errors import OutOfScopeError

ACCEPTED_MODALITIES = frozenset({"CR", "DX"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
CHEST = "CHEST"
TRAINING_AGES = (1.0, 94.0)  # years; see the module docstring for where they come from
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_YEARS_PER = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
GATE_ENV = "COVID_CXR_GATE"
BYPASS = f"for research only, --no-gate or {GATE_ENV}=off bypasses this check"
_HINT = f"the model judges frontal (PA or AP) chest radiographs (CR or DX) only; {BYPASS}"


def _text(dataset: Any, keyword: str) -> str:
    value = dataset.get(keyword) if dataset is not None else None
    return str(value).strip().upper() if value not in (None, "") else ""


def check_header(dataset: Any, source: str) -> None:
    """Raise OutOfScopeError when the DICOM header says this is not a frontal chest radiograph."""
    modality = _text(dataset, "Modality")
    if modality and modality not in ACCEPTED_MODALITIES:
        raise OutOfScopeError(source, f"out of scope: wrong modality ({modality})", _HINT)
    view = _text(dataset, "ViewPosition")
    if view and view not in FRONTAL_VIEWS:
        kind = "lateral view" if view in {"LL", "RL", "LATERAL", "LAT"} else "not a frontal view"
        raise OutOfScopeError(source, f"out of scope: {kind} ({view})", _HINT)
    body_part = _text(dataset, "BodyPartExamined")
    if body_part and body_part != CHEST:
        raise OutOfScopeError(source, f"out of scope: body part {body_part} is not {CHEST}", _HINT)


def age_years(dataset: Any) -> float | None:
    """PatientAge ("045Y", "006M", "003W", "002D") in years; None when absent or malformed."""
    match = _AGE.match(_text(dataset, "PatientAge"))
    if match is None:
        return None
    return int(match.group(1)) * _YEARS_PER[match.group(2)]


def age_warning(dataset: Any) -> str | None:
    """A warning when the patient's age lies outside the ages the model saw in training."""
    age = age_years(dataset)
    low, high = TRAINING_AGES
    if age is None or low <= age <= high:
        return None
    shown = f"{age:.0f} years" if age >= 1 else f"{age * 12:.0f} months"
    return (
        f"patient age {shown} is outside the ages seen in training ({low:.0f} to {high:.0f} "
        "years): the result is less reliable"
    )
