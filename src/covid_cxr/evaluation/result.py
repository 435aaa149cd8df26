"""What `covid-cxr evaluate` found, as typed data: the one definition of `metrics.json`.

`evaluate()` returns an `EvaluationResult`; metrics.json (`to_dict`), report.md/html and the
CLI's summary are all written from it, so none of them can show a number another lacks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covid_cxr.fileio import atomic_write_text


@dataclass(frozen=True)
class Estimate:
    """A metric with its 95% CI; `value` None (and `reason` set) when undefined on the data."""

    value: float | None
    ci: tuple[float, float] | None = None
    reason: str | None = None
    ci_resamples: int | None = None

    def __str__(self) -> str:
        """'0.912 (0.881–0.940)', or 'n/a: why' for an undefined metric."""
        if self.value is None:
            return f"n/a: {self.reason}"
        if self.ci is None:
            return f"{self.value:.3f}"
        lo, hi = self.ci
        return f"{self.value:.3f} ({lo:.3f}–{hi:.3f})"


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int


@dataclass
class AtThreshold:
    """Threshold metrics at one operating point (the threshold held fixed in the bootstrap)."""

    threshold: float
    confusion: Confusion
    metrics: dict[str, Estimate]


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    mean_probability: float | None
    fraction_covid: float | None


@dataclass
class SubsetResult:
    """Every metric for one set of images (all of them, or one source)."""

    n: int
    n_covid: int
    n_non_covid: int
    n_clusters: int
    scores: dict[str, Estimate]
    operating_points: dict[str, AtThreshold]
    reliability: list[ReliabilityBin] = field(default_factory=list)


@dataclass
class ModelSummary:
    path: str
    runtime: str
    name: str
    options: dict[str, Any]
    version: str
    preprocess: dict[str, Any]
    thresholds: dict[str, float]
    operating_point: str


@dataclass(frozen=True)
class FileProblem:
    """A file that produced no score, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ReaderExclusion:
    """A file or row the data reader left out (hidden file, missing image, ...)."""

    source: str
    item: str
    kind: str
    reason: str


@dataclass(frozen=True)
class SourceCount:
    images: int
    covid: int
    non_covid: int
    patients: int


@dataclass
class DataSummary:
    path: str
    split: str
    listed: int
    scored: int
    unreadable: list[FileProblem]
    excluded_by_reader: list[ReaderExclusion]
    notes: list[str]
    sources: dict[str, SourceCount]
    labels: dict[str, int]


@dataclass
class ValidationSummary:
    """The data the thresholds were chosen on."""

    origin: str
    listed: int
    scored: int
    n_covid: int
    unreadable: list[FileProblem]
    overlap_with_evaluated: int


@dataclass(frozen=True)
class BootstrapMethod:
    resamples: int
    seed: int
    level: float
    interval: str
    unit: str


@dataclass(frozen=True)
class Method:
    bootstrap: BootstrapMethod
    calibration: str
    positive_rule: str


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    origin: str


@dataclass(frozen=True)
class ErrorCase:
    """One of the most confident errors shown in the report."""

    error: str  # "false positive" or "false negative"
    probability: float
    path: str
    label: str
    source: str
    patient_id: str


@dataclass(frozen=True)
class StoredThresholds:
    """What `--store-thresholds` wrote into the model file."""

    path: str
    thresholds: dict[str, float]
    operating_point: str


@dataclass
class EvaluationResult:
    notice: str
    generated: str
    covid_cxr_version: str
    model: ModelSummary
    data: DataSummary
    validation: ValidationSummary | None
    method: Method
    operating_points: dict[str, OperatingPoint]
    operating_points_origin: str
    primary_operating_point: str
    overall: SubsetResult
    per_source: dict[str, SubsetResult]
    errors: list[ErrorCase]
    errors_note: str
    figures: dict[str, str]
    stored: StoredThresholds | None = None
    # Mean share of Grad-CAM mass inside the lung mask: "all" and per source.
    cam_in_lungs: dict[str, Estimate] = field(default_factory=dict)
    cam_in_lungs_note: str = ""

    @property
    def at_primary(self) -> AtThreshold:
        return self.overall.operating_points[self.primary_operating_point]

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json form (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def write_json(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))
