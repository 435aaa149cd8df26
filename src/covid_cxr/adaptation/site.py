"""The decision at one site, from features alone: refit or keep the base head, and where to cut.

Shared by `covid-cxr adapt` and `benchmarks/adaptation.py`, so the benchmark measures exactly
what the command does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from covid_cxr.adaptation.crossval import (
    CrossValidation,
    choose_c,
    cross_validate,
    fold_count,
    patient_folds,
)
from covid_cxr.adaptation.head import Basis, LinearHead, fit_head
from covid_cxr.errors import DataError
from covid_cxr.evaluation.metrics import assess
from covid_cxr.evaluation.result import Estimate
from covid_cxr.evaluation.thresholds import (
    sensitivity_name,
    sensitivity_threshold,
    youden_threshold,
)
from covid_cxr.numeric import sigmoid

METHODS = ("logistic", "threshold")
STORED_SENSITIVITIES = (0.90, 0.95)

ThresholdRule = Callable[[np.ndarray, np.ndarray], float]


def parse_operating_point(text: str) -> tuple[str, ThresholdRule]:
    """`youden`, `sensitivity-0.90` or `sensitivity_90` -> stored name and threshold rule."""
    if text == "youden":
        return "youden", youden_threshold
    match = re.fullmatch(r"sensitivity[-_](0?\.\d+|\d+)", text)
    target = float(match.group(1)) if match else 0.0
    target = target / 100 if target > 1 else target
    if not 0 < target <= 1:
        raise DataError(
            f"operating point {text!r} is not understood; use youden or sensitivity-0.90 "
            "(any target sensitivity between 0 and 1)"
        )
    return sensitivity_name(target), lambda y, p: sensitivity_threshold(y, p, target)


@dataclass(frozen=True)
class SiteFigures:
    """Cross-validated figures of one head on the local data (95% CIs over patients)."""

    roc_auc: Estimate
    sensitivity: Estimate
    specificity: Estimate


@dataclass
class SiteFit:
    """What adapt decided for the site."""

    head: LinearHead
    adopted: bool  # the refitted head, not the base one
    verdict: str
    base: SiteFigures
    adapted: SiteFigures | None  # None with method "threshold"
    thresholds: dict[str, float]
    operating_point: str
    c: float | None
    cv: CrossValidation | None


def _decisions(y: np.ndarray, p: np.ndarray, folds: np.ndarray, rule: ThresholdRule) -> np.ndarray:
    """Each image decided at a threshold chosen on the other folds (honest sens./spec.)."""
    out = np.zeros(y.size)
    for fold in np.unique(folds):
        test = folds == fold
        out[test] = p[test] >= rule(y[~test], p[~test])
    return out


def site_figures(
    y: np.ndarray,
    p: np.ndarray,
    clusters: np.ndarray,
    rule: ThresholdRule,
    resamples: int,
    seed: int,
) -> SiteFigures:
    """AUC of scores `p`, and sensitivity/specificity at thresholds chosen out of fold."""
    folds = patient_folds(y, clusters, fold_count(y, clusters), seed)
    ranking = assess(y, p, clusters, {}, resamples, seed)
    decided = assess(y, _decisions(y, p, folds, rule), clusters, {"t": 0.5}, resamples, seed)
    metrics = decided.operating_points["t"].metrics
    return SiteFigures(ranking.scores["roc_auc"], metrics["sensitivity"], metrics["specificity"])


def choose_thresholds(
    y: np.ndarray, p: np.ndarray, name: str, rule: ThresholdRule
) -> dict[str, float]:
    """The operating points stored in the adapted model, all chosen on the site's data."""
    thresholds = {"default": 0.5, "youden": youden_threshold(y, p)}
    for target in STORED_SENSITIVITIES:
        thresholds[sensitivity_name(target)] = sensitivity_threshold(y, p, target)
    thresholds[name] = rule(y, p)
    return thresholds


def verdict(base: SiteFigures, adapted: SiteFigures | None) -> tuple[bool, str]:
    """Keep the refit only when its cross-validated AUC beats the base model's and its CI
    excludes chance (shuffled labels can beat a poor base model by luck alone)."""
    if adapted is None:
        return False, "method 'threshold': the base head is kept, only the site threshold is new"
    gain = (adapted.roc_auc.value or 0.0) - (base.roc_auc.value or 0.0)
    low = adapted.roc_auc.ci[0] if adapted.roc_auc.ci else 0.0
    if gain > 0 and low > 0.5:
        return True, f"adapted head kept: cross-validated ROC-AUC {gain:+.3f} over the base model"
    why = "does not beat the base model" if gain <= 0 else "is not clearly better than chance"
    return False, (
        f"adaptation {why} in cross-validation (ROC-AUC {adapted.roc_auc} vs base "
        f"{base.roc_auc}): the base head is kept and only the site threshold is new"
    )


def fit_site(
    pooled: np.ndarray,
    base_logits: np.ndarray,
    y: np.ndarray,
    clusters: np.ndarray,
    base_head: LinearHead,
    *,
    method: str = "logistic",
    operating_point: str = "youden",
    repeats: int = 5,
    resamples: int = 1000,
    seed: int = 0,
) -> SiteFit:
    """Cross-validate base and refitted heads by patient, decide, and choose the thresholds."""
    if method not in METHODS:
        raise DataError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    name, rule = parse_operating_point(operating_point)
    base_p = sigmoid(base_logits)
    base = site_figures(y, base_p, clusters, rule, resamples, seed)
    cv = adapted = None
    if method == "logistic":
        cv = cross_validate(pooled, y, clusters, repeats, seed)
        adapted = site_figures(y, sigmoid(cv.logits), clusters, rule, resamples, seed)
    adopted, says = verdict(base, adapted)
    head, c, p = base_head, None, base_p
    if adopted and cv is not None:
        c = choose_c(pooled, y, clusters, seed)
        head = fit_head(Basis.of(pooled), y, c)
        p = sigmoid(cv.logits)
    thresholds = choose_thresholds(y, p, name, rule)
    return SiteFit(head, adopted, says, base, adapted, thresholds, name, c, cv)
