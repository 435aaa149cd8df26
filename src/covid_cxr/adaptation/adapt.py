"""`covid-cxr adapt` end to end: read the local labelled radiographs, cross-validate the base
head and a refitted one by patient, keep the refit only when it wins, choose the site's
threshold from cross-validated predictions, and write an ordinary model file.

When the refit does not beat the base model in cross-validation, the base head is kept and the
written model differs from the base only in its site threshold and metadata: a head that did not
prove itself on the site's own labels is not worth the risk of having learnt its noise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr.adaptation.crossval import (
    CrossValidation,
    choose_c,
    cross_validate,
    fold_count,
    patient_folds,
)
from covid_cxr.adaptation.features import LocalFeatures, extract_features
from covid_cxr.adaptation.head import Basis, LinearHead, fit_head
from covid_cxr.adaptation.onnx_model import write_adapted
from covid_cxr.data.manifest import load_labelled
from covid_cxr.data.sources import Exclusion
from covid_cxr.errors import DataError, ModelError
from covid_cxr.evaluation.bootstrap import cluster_ids
from covid_cxr.evaluation.metrics import assess
from covid_cxr.evaluation.thresholds import (
    sensitivity_name,
    sensitivity_threshold,
    youden_threshold,
)
from covid_cxr.inference.batch import Failure
from covid_cxr.inference.metadata import read_metadata
from covid_cxr.inference.predictor import Predictor
from covid_cxr.inference.runtime import sigmoid
from covid_cxr.models.info import ModelInfo

MIN_PER_CLASS = 10
MIN_PATIENTS_PER_CLASS = 3
METHODS = ("logistic", "threshold")
STORED_SENSITIVITIES = (0.90, 0.95)


@dataclass
class AdaptOptions:
    data: Path
    out: Path
    model: str | Path | None = None
    site: str | None = None  # default: the name of the data folder or CSV
    operating_point: str = "youden"
    method: str = "logistic"
    repeats: int = 5
    resamples: int = 1000
    seed: int = 0
    workers: int = 2
    threads: int | None = 2


@dataclass(frozen=True)
class Estimate:
    value: float | None
    ci: tuple[float, float] | None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Estimate:
        return cls(entry["value"], tuple(entry["ci"]) if entry["ci"] else None)

    def __str__(self) -> str:
        if self.value is None:
            return "undefined"
        ci = f" ({self.ci[0]:.3f}-{self.ci[1]:.3f})" if self.ci else ""
        return f"{self.value:.3f}{ci}"


@dataclass(frozen=True)
class SiteFigures:
    """Cross-validated figures of one head on the local data."""

    roc_auc: Estimate
    sensitivity: Estimate
    specificity: Estimate


@dataclass
class AdaptResult:
    out: Path
    site: str
    counts: dict[str, int]
    base: SiteFigures
    adapted: SiteFigures | None  # None with --method threshold
    adopted: bool  # the refitted head is in the written model
    verdict: str
    info: ModelInfo
    c: float | None = None
    failures: list[Failure] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    seconds: float = 0.0


def parse_operating_point(text: str) -> tuple[str, Callable[[np.ndarray, np.ndarray], float]]:
    """`youden`, `sensitivity-0.90` or `sensitivity_90` -> stored name and threshold rule."""
    if text == "youden":
        return "youden", youden_threshold
    match = re.fullmatch(r"sensitivity[-_](0?\.\d+|\d+)", text)
    if match:
        value = float(match.group(1))
        target = value / 100 if value > 1 else value
        if 0 < target <= 1:
            return sensitivity_name(target), lambda y, p: sensitivity_threshold(y, p, target)
    raise DataError(
        f"operating point {text!r} is not understood; use youden or sensitivity-0.90 "
        "(any target sensitivity between 0 and 1)"
    )


def check_counts(y: np.ndarray, clusters: np.ndarray, where: str) -> None:
    """Refuse local data too small to adapt to or to measure on, saying what to add."""
    covid, other = int(y.sum()), int(y.size - y.sum())
    if min(covid, other) < MIN_PER_CLASS:
        raise DataError(
            f"{where}: {covid} COVID-19 and {other} non-COVID radiographs; adapt needs at least "
            f"{MIN_PER_CLASS} of each class (50 of each is better) to fit and to measure "
            "anything. Label more of your site's radiographs, then run adapt again"
        )
    patients = [np.unique(clusters[y == label]).size for label in (1, 0)]
    if min(patients) < MIN_PATIENTS_PER_CLASS:
        raise DataError(
            f"{where}: the radiographs come from {patients[0]} COVID-19 and {patients[1]} "
            f"non-COVID patients; cross-validation by patient needs at least "
            f"{MIN_PATIENTS_PER_CLASS} patients per class. Add radiographs of other patients"
        )


def _decisions(
    y: np.ndarray, p: np.ndarray, folds: np.ndarray, rule: Callable[..., float]
) -> np.ndarray:
    """Each image decided at a threshold chosen on the other folds (honest sens./spec.)."""
    out = np.zeros(y.size)
    for fold in np.unique(folds):
        test = folds == fold
        out[test] = p[test] >= rule(y[~test], p[~test])
    return out


def _figures(
    y: np.ndarray, p: np.ndarray, clusters: np.ndarray, rule: Callable[..., float], o: AdaptOptions
) -> SiteFigures:
    folds = patient_folds(y, clusters, fold_count(y, clusters), o.seed)
    ranking = assess(y, p, clusters, {}, o.resamples, o.seed)
    decided = assess(y, _decisions(y, p, folds, rule), clusters, {"t": 0.5}, o.resamples, o.seed)
    metrics = decided["operating_points"]["t"]["metrics"]
    return SiteFigures(
        Estimate.of(ranking["scores"]["roc_auc"]),
        Estimate.of(metrics["sensitivity"]),
        Estimate.of(metrics["specificity"]),
    )


def _thresholds(y: np.ndarray, p: np.ndarray, name: str, rule: Callable[..., float]) -> dict:
    thresholds = {"default": 0.5, "youden": youden_threshold(y, p)}
    for target in STORED_SENSITIVITIES:
        thresholds[sensitivity_name(target)] = sensitivity_threshold(y, p, target)
    thresholds[name] = rule(y, p)
    return thresholds


def _verdict(base: SiteFigures, adapted: SiteFigures | None) -> tuple[bool, str]:
    if adapted is None:
        return False, "method 'threshold': base head kept, only the site threshold is new"
    gain = (adapted.roc_auc.value or 0.0) - (base.roc_auc.value or 0.0)
    low = adapted.roc_auc.ci[0] if adapted.roc_auc.ci else 0.0
    if gain > 0 and low > 0.5:
        return True, f"adapted head kept: cross-validated AUC {gain:+.3f} over the base model"
    why = "does not beat the base model" if gain <= 0 else "is not clearly better than chance"
    return False, (
        f"adaptation {why} in cross-validation (AUC {adapted.roc_auc} vs base {base.roc_auc}): "
        "the base head is kept and only the site threshold is new"
    )


def _site_name(options: AdaptOptions) -> str:
    return options.site or options.data.resolve().stem


def _info(base_info: ModelInfo, options: AdaptOptions, summary: dict[str, Any]) -> ModelInfo:
    day = datetime.now(UTC).strftime("%Y%m%d")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", _site_name(options)).strip("-").lower() or "site"
    data = base_info.to_dict()
    data["version"] = f"{base_info.version}+{slug}-{day}"
    data["metadata"] = {**base_info.metadata, "adaptation": summary}
    data["thresholds"], data["operating_point"] = summary.pop("thresholds"), summary.pop("point")
    return ModelInfo.from_dict(data)


def _load(options: AdaptOptions) -> tuple[Predictor, LocalFeatures, list[Exclusion]]:
    rows = load_labelled(options.data)
    y = np.array([row.target for row in rows])
    check_counts(
        y, cluster_ids([r.patient_id for r in rows], [r.source for r in rows]), str(options.data)
    )
    predictor = Predictor(options.model, threads=options.threads)
    local = extract_features(predictor, rows, workers=options.workers)
    return predictor, local, rows.excluded


def adapt(options: AdaptOptions) -> AdaptResult:
    """Adapt the model to the site's labelled radiographs and write the adapted model."""
    if options.method not in METHODS:
        raise DataError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    start = time.perf_counter()
    name, rule = parse_operating_point(options.operating_point)
    predictor, local, excluded = _load(options)
    y = local.targets
    clusters = cluster_ids([r.patient_id for r in local.rows], [r.source for r in local.rows])
    check_counts(y, clusters, f"{options.data} (after {len(local.failures)} unreadable)")
    base_p = sigmoid(local.base_logits)
    base = _figures(y, base_p, clusters, rule, options)
    cv: CrossValidation | None = None
    adapted = None
    if options.method == "logistic":
        cv = cross_validate(local.pooled, y, clusters, options.repeats, options.seed)
        adapted = _figures(y, sigmoid(cv.logits), clusters, rule, options)
    adopted, verdict = _verdict(base, adapted)
    _, cam = read_metadata(predictor.path)
    assert cam is not None  # extract_features refused models without a CAM head
    head = LinearHead(cam.weight.astype(np.float64), cam.bias)
    c = None
    p = base_p
    if adopted and cv is not None:
        c = choose_c(local.pooled, y, clusters, options.seed)
        head = fit_head(Basis.of(local.pooled), y, c)
        p = sigmoid(cv.logits)
    summary = {
        "site": _site_name(options),
        "base_model": predictor.path.name,
        "base_version": predictor.version,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": options.method,
        "head": "refitted" if adopted else "base",
        "verdict": verdict,
        "counts": {
            "covid": int(y.sum()),
            "non_covid": int(y.size - y.sum()),
            "patients": int(np.unique(clusters).size),
            "unreadable": len(local.failures),
        },
        "c": c,
        "cross_validation": {
            "folds": cv.folds if cv else None,
            "repeats": cv.repeats if cv else None,
            "base": asdict(base),
            "adapted": asdict(adapted) if adapted else None,
        },
        "thresholds": _thresholds(y, p, name, rule),
        "point": name,
    }
    info = _info(predictor.info, options, summary)
    write_adapted(predictor.path, options.out, head, info)
    _check_written(options.out, local, head)
    return AdaptResult(
        options.out,
        _site_name(options),
        summary["counts"],
        base,
        adapted,
        adopted,
        verdict,
        info,
        c,
        local.failures,
        excluded,
        time.perf_counter() - start,
    )


def _check_written(path: Path, local: LocalFeatures, head: LinearHead) -> None:
    """The written model must compute the head we fitted (guards the graph rewrite)."""
    if local.sample is None:
        return
    written = Predictor(path, threads=1).runtime.logits(local.sample)[0]
    expected = head.logits(local.pooled[:1])[0]
    if not np.isclose(written, expected, rtol=1e-3, atol=1e-3):
        path.unlink(missing_ok=True)
        raise ModelError(f"{path}: the written model gives logit {written:.4f}, not {expected:.4f}")
