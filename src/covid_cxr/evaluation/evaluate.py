"""`covid-cxr evaluate` end to end: score the data, choose operating points on validation
data, compute every metric with its CI (overall and per source), draw the figures and explain
the most confident errors. The typed `EvaluationResult` it returns is what `write_outputs`
turns into metrics.json and the reports; storing thresholds into the model file is a separate
step (`covid_cxr.evaluation.store`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covid_cxr import RESEARCH_NOTICE, __version__
from covid_cxr.data.manifest import ManifestRow, load_labelled, shown_path
from covid_cxr.errors import CovidCxrError, DataError, ModelError
from covid_cxr.evaluation import plots
from covid_cxr.evaluation.attention import summarise
from covid_cxr.evaluation.bootstrap import CI_LEVEL, cluster_ids
from covid_cxr.evaluation.calibration import ECE_BINS, reliability
from covid_cxr.evaluation.metrics import assess
from covid_cxr.evaluation.report import write_reports
from covid_cxr.evaluation.result import (
    BootstrapMethod,
    DataSummary,
    ErrorCase,
    EvaluationResult,
    FileProblem,
    Method,
    ModelSummary,
    OperatingPoint,
    ReaderExclusion,
    SourceCount,
    SubsetResult,
    ValidationSummary,
)
from covid_cxr.evaluation.scoring import Scored, score_rows
from covid_cxr.evaluation.thresholds import (
    BALANCED_YOUDEN,
    DEFAULT_THRESHOLD,
    choose_operating_points,
)
from covid_cxr.explain.gradcam import overlay
from covid_cxr.imaging.preprocess import grey_to_uint8
from covid_cxr.inference.predictor import Predictor
from covid_cxr.models.info import ModelInfo

if TYPE_CHECKING:
    from covid_cxr.segmentation import LungSegmenter

ALL = "all"


@dataclass
class EvaluateOptions:
    model: str | Path | None
    data: Path
    out: Path
    split: str | None = None  # None: the test split when the data has one, else every row
    threshold_from: Path | None = None
    resamples: int = 1000
    seed: int = 0
    target_sensitivity: float = 0.95
    cam_errors: int = 12
    store: bool = False
    operating_point: str | None = None
    workers: int = 2
    batch_size: int = 32
    threads: int | None = None
    cam_in_lungs: bool = True  # measure where Grad-CAM lies with the shipped lung segmenter


def select_split(rows: Sequence[ManifestRow], split: str | None) -> tuple[list[ManifestRow], str]:
    splits = Counter(row.split for row in rows)
    if split is None:
        split = "test" if splits["test"] else ALL
    if split == ALL:
        return list(rows), ALL
    chosen = [row for row in rows if row.split == split]
    if not chosen:
        have = ", ".join(f"{k} ({v})" for k, v in sorted(splits.items()))
        raise DataError(f"the data has no rows in split {split!r}; it has: {have} (or use 'all')")
    return chosen, split


def _validation_rows(
    data_rows: Sequence[ManifestRow], options: EvaluateOptions, split: str
) -> tuple[list[ManifestRow], str] | None:
    """Rows to choose thresholds on, and where they came from; None when there are none."""
    if options.threshold_from is not None:
        rows = load_labelled(options.threshold_from)
        val = [row for row in rows if row.split == "val"]
        if val:
            return val, f"the val split of {options.threshold_from}"
        return list(rows), f"all images of {options.threshold_from}"
    val = [row for row in data_rows if row.split == "val"]
    if val and split != "val":
        return val, f"the val split of {options.data}"
    return None


def _source_counts(rows: Sequence[ManifestRow]) -> dict[str, SourceCount]:
    by_source: dict[str, list[ManifestRow]] = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row)
    return {
        name: SourceCount(
            images=len(members),
            covid=sum(r.target for r in members),
            non_covid=sum(1 - r.target for r in members),
            patients=len({r.patient_id for r in members}),
        )
        for name, members in sorted(by_source.items())
    }


def _failures(scored: Scored) -> list[FileProblem]:
    return [FileProblem(shown_path(f.source), f.reason) for f in scored.unreadable]


def _subset(
    scored: Scored, mask: np.ndarray, thresholds: dict[str, float], o: EvaluateOptions
) -> SubsetResult:
    """Metrics with CIs and the reliability table for the images selected by `mask`."""
    rows = [row for row, keep in zip(scored.rows, mask, strict=True) if keep]
    y, p = scored.targets[mask], scored.probabilities[mask]
    clusters = cluster_ids([r.patient_id for r in rows], [r.source for r in rows])
    result = assess(y, p, clusters, thresholds, o.resamples, o.seed)
    result.reliability = reliability(y, p)
    return result


def _confident_errors(scored: Scored, threshold: float, count: int) -> list[int]:
    """Indices of the false positives with the highest and false negatives with the lowest
    probabilities, half of `count` each (the other kind fills in when one runs short)."""
    y, p = scored.targets, scored.probabilities
    fp = np.flatnonzero((y == 0) & (p >= threshold))
    fp = fp[np.argsort(-p[fp], kind="stable")]
    fn = np.flatnonzero((y == 1) & (p < threshold))
    fn = fn[np.argsort(p[fn], kind="stable")]
    n_fp = min(fp.size, max(count // 2, count - fn.size))
    return [int(i) for i in (*fp[:n_fp], *fn[: count - n_fp])]


def _error_panels(
    predictor: Predictor, scored: Scored, indices: list[int]
) -> tuple[list[tuple[np.ndarray, str]], str]:
    cam = predictor.cam_available
    note = (
        "Each radiograph at its own resolution with the Grad-CAM map of the COVID-19 logit "
        "overlaid (red: strongest evidence for COVID-19)."
        if cam
        else f"No heat maps: {predictor.runtime.cam_unavailable}"
    )
    predictions = predictor.predict_batch([scored.rows[i].path for i in indices], cam=cam)
    panels = []
    for i, prediction in zip(indices, predictions, strict=True):
        row = scored.rows[i]
        pixels = prediction.radiograph.pixels
        image = (
            overlay(pixels, prediction.cam, crop=predictor.info.preprocess.crop, box=prediction.box)
            if prediction.cam is not None
            else grey_to_uint8(pixels)
        )
        caption = "false positive" if row.target == 0 else "false negative"
        caption += f", p={prediction.probability:.3f}\n{row.source}: {row.path.name[:28]}"
        if prediction.cam is not None and not prediction.cam.any():
            caption += "\n(empty map: no region raises the COVID-19 score)"
        panels.append((image, caption))
    return panels, note


def _operating_points(
    predictor: Predictor,
    data_rows: Sequence[ManifestRow],
    rows: Sequence[ManifestRow],
    split: str,
    o: EvaluateOptions,
) -> tuple[ValidationSummary | None, dict[str, float], dict[str, str], str]:
    """(validation summary, thresholds, origin of each, a sentence on where they came from).

    Without validation data the thresholds stored in the model are evaluated as they are:
    the right thing for an external test set.
    """
    info = predictor.info
    chosen = _validation_rows(data_rows, o, split)
    if chosen is None:
        thresholds = {"default": DEFAULT_THRESHOLD, **info.thresholds}
        origins = {op: "stored in the model" for op in info.thresholds}
        origins.setdefault("default", "fixed at 0.5")
        return None, thresholds, origins, "No validation data: the model's stored thresholds."
    val_rows, val_origin = chosen
    val = score_rows(
        predictor, val_rows, desc="validation", workers=o.workers, batch_size=o.batch_size
    )
    if not val.rows:
        raise DataError(f"none of the {len(val_rows)} validation images could be read")
    sources = [row.source for row in val.rows]
    thresholds = choose_operating_points(
        val.targets, val.probabilities, o.target_sensitivity, sources
    )
    origins = {op: f"sensitivity >= {o.target_sensitivity:g} on {val_origin}" for op in thresholds}
    origins.update(default="fixed at 0.5", youden=f"Youden's J on {val_origin}")
    if BALANCED_YOUDEN in thresholds:
        origins[BALANCED_YOUDEN] = f"Youden's J, every (source, class) equal, on {val_origin}"
    overlap = {r.sha256 for r in val.rows if r.sha256} & {r.sha256 for r in rows if r.sha256}
    validation = ValidationSummary(
        origin=val_origin,
        listed=len(val_rows),
        scored=len(val.rows),
        n_covid=int(val.targets.sum()),
        unreadable=_failures(val),
        overlap_with_evaluated=len(overlap),
    )
    return validation, thresholds, origins, f"Chosen on {val_origin} ({len(val.rows)} images)."


def _draw_figures(
    out: Path,
    predictor: Predictor,
    scored: Scored,
    overall: SubsetResult,
    sources: list[str],
    thresholds: dict[str, float],
    primary: str,
    cam_errors: int,
) -> tuple[dict[str, str], list[int], str]:
    """The PNGs (name -> file name), the indices of the errors shown, and a note on them."""
    y, p = scored.targets, scored.probabilities
    source_of = np.array([row.source for row in scored.rows])
    figures: dict[str, str] = {}
    curves = {"all images": (y, p)} | {s: (y[source_of == s], p[source_of == s]) for s in sources}
    figures["roc"] = plots.roc_figure(curves, thresholds, out / "roc.png").name
    figures["pr"] = plots.pr_figure(curves, thresholds, out / "pr.png").name
    ece = overall.scores["ece"].value
    figures["reliability"] = plots.reliability_figure(
        overall.reliability, ece, out / "reliability.png"
    ).name
    figures["confusion"] = plots.confusion_figure(
        overall.operating_points[primary].confusion,
        primary,
        thresholds[primary],
        out / "confusion.png",
    ).name
    indices = _confident_errors(scored, thresholds[primary], cam_errors)
    errors_note = ""
    if indices:
        try:
            panels, errors_note = _error_panels(predictor, scored, indices)
            figures["errors"] = plots.errors_figure(
                panels,
                f"Most confident errors at '{primary}' (t={thresholds[primary]:.3g})",
                out / "errors.png",
            ).name
        except CovidCxrError as exc:  # a file changed since it was scored
            errors_note = f"error grid not drawn: {exc}"

    return figures, indices, errors_note


def evaluate(options: EvaluateOptions) -> EvaluationResult:
    """Score, assess and draw; the figures land in `options.out`, the rest is returned."""
    o = options
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(o.model, threads=o.threads)
    data_rows = load_labelled(o.data)
    rows, split = select_split(data_rows, o.split)

    validation, thresholds, origins, points_origin = _operating_points(
        predictor, data_rows, rows, split, o
    )
    primary = _primary(predictor.info, thresholds, o.operating_point)
    if o.store and validation is None:
        raise DataError(
            "--store-thresholds needs validation data: a manifest with a val split or "
            "--threshold-from LABELLED_DATA"
        )

    lungs, lungs_note = _lung_segmenter(predictor, o.cam_in_lungs)
    scored = score_rows(
        predictor,
        rows,
        desc="evaluating",
        workers=o.workers,
        batch_size=o.batch_size,
        lungs=lungs,
    )
    if not scored.rows:
        reasons = Counter(f.reason for f in scored.unreadable).most_common(3)
        raise DataError(f"none of the {len(rows)} images could be read; most common: {reasons}")

    y, p = scored.targets, scored.probabilities
    sources = sorted({row.source for row in scored.rows})
    source_of = np.array([row.source for row in scored.rows])
    overall = _subset(scored, np.ones(y.size, dtype=bool), thresholds, o)
    per_source = (
        {s: _subset(scored, source_of == s, thresholds, o) for s in sources}
        if len(sources) > 1
        else {}
    )
    figures, indices, errors_note = _draw_figures(
        out, predictor, scored, overall, list(per_source), thresholds, primary, o.cam_errors
    )
    return EvaluationResult(
        notice=RESEARCH_NOTICE,
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        covid_cxr_version=__version__,
        model=_model_summary(predictor),
        data=_data_summary(o.data, split, rows, data_rows, scored),
        validation=validation,
        method=_method(o),
        operating_points={op: OperatingPoint(t, origins[op]) for op, t in thresholds.items()},
        operating_points_origin=points_origin,
        primary_operating_point=primary,
        overall=overall,
        per_source=per_source,
        errors=[_error_case(scored.rows[i], float(p[i])) for i in indices],
        errors_note=errors_note,
        figures=figures,
        cam_in_lungs=summarise(scored.cam_in_lungs, scored.rows, o.resamples, o.seed)
        if lungs is not None
        else {},
        cam_in_lungs_note=lungs_note,
    )


def _lung_segmenter(predictor: Predictor, wanted: bool) -> tuple[LungSegmenter | None, str]:
    """The shipped segmenter when Grad-CAM's share inside the lungs can be measured."""
    if not wanted:
        return None, "not measured (--no-cam-in-lungs)"
    if not predictor.cam_available:
        return None, f"not measured: {predictor.runtime.cam_unavailable}"
    from covid_cxr.segmentation import LungSegmenter

    try:
        lungs = LungSegmenter()
    except ModelError as exc:
        return None, f"not measured: no lung segmenter ({exc})"
    return lungs, (
        f"Share of each image's Grad-CAM mass inside its lung mask ({lungs.info.version}, "
        "the shipped lung segmenter); mean per source with 95% CIs resampling patients."
    )


def _primary(info: ModelInfo, thresholds: dict[str, float], requested: str | None) -> str:
    primary = requested or (
        info.operating_point if info.operating_point in thresholds else "default"
    )
    if primary not in thresholds:
        raise ModelError(f"no operating point {primary!r}; available: {', '.join(thresholds)}")
    return primary


def _model_summary(predictor: Predictor) -> ModelSummary:
    info = predictor.info
    return ModelSummary(
        path=shown_path(predictor.path),
        runtime=predictor.runtime.kind,
        name=info.name,
        options=info.options,
        version=info.version,
        preprocess=info.preprocess.to_dict(),
        thresholds=info.thresholds,
        operating_point=info.operating_point,
    )


def _data_summary(
    data: Path,
    split: str,
    rows: Sequence[ManifestRow],
    data_rows: Sequence[ManifestRow],
    scored: Scored,
) -> DataSummary:
    return DataSummary(
        path=shown_path(data),
        split=split,
        listed=len(rows),
        scored=len(scored.rows),
        unreadable=_failures(scored),
        excluded_by_reader=[
            ReaderExclusion(x.source, x.item, x.kind, x.reason)
            for x in getattr(data_rows, "excluded", [])
        ],
        notes=list(getattr(data_rows, "notes", [])),
        sources=_source_counts(scored.rows),
        labels=dict(Counter(row.label for row in scored.rows).most_common()),
    )


def _method(o: EvaluateOptions) -> Method:
    return Method(
        bootstrap=BootstrapMethod(
            resamples=o.resamples,
            seed=o.seed,
            level=CI_LEVEL,
            interval="percentile",
            unit="patients (images of one patient are resampled together; an image "
            "without a patient id counts as its own patient)",
        ),
        calibration=f"expected calibration error over {ECE_BINS} equal-width bins of the "
        "predicted probability on [0, 1], weighted by bin size",
        positive_rule="COVID-19 when probability >= threshold",
    )


def _error_case(row: ManifestRow, probability: float) -> ErrorCase:
    return ErrorCase(
        error="false positive" if row.target == 0 else "false negative",
        probability=probability,
        path=shown_path(row.path),
        label=row.label,
        source=row.source,
        patient_id=row.patient_id,
    )


def write_outputs(result: EvaluationResult, out: Path) -> None:
    """metrics.json and report.md/html, all from the one result."""
    result.write_json(Path(out) / "metrics.json")
    write_reports(result, Path(out))
