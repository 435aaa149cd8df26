"""Diagnostic metrics, each with a bootstrap confidence interval.

Every metric is written for a matrix of image weights (resamples, n_images): the point
estimate is the single all-ones row, the bootstrap is the resampled multiplicities, so one
implementation serves both and 1000 resamples cost a few matrix products. A metric that is
undefined on the data (specificity without non-COVID images, AUC with one class) is NaN here
and reported as null with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from covid_cxr.evaluation.bootstrap import percentile_ci, resample_weights
from covid_cxr.evaluation.calibration import ECE_BINS, bin_index
from covid_cxr.evaluation.result import AtThreshold, Confusion, Estimate, SubsetResult

THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
SCORE_METRICS = ("roc_auc", "pr_auc", "brier", "ece")

_ONE_CLASS = "needs both COVID-19 and non-COVID images; only one class is present"
REASONS = {
    "accuracy": "no images",
    "sensitivity": "no COVID-19 images",
    "specificity": "no non-COVID images",
    "ppv": "no image is predicted COVID-19 at this threshold",
    "npv": "no image is predicted non-COVID at this threshold",
    "f1": "no COVID-19 images and none predicted COVID-19",
    "roc_auc": _ONE_CLASS,
    "pr_auc": _ONE_CLASS,
    "brier": "no images",
    "ece": "no images",
}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (the metric is undefined there)."""
    out = np.full(np.broadcast(num, den).shape, np.nan, dtype=np.result_type(num, den))
    return np.divide(num, den, out=out, where=den > 0)


def confusion_counts(
    w: np.ndarray, y: np.ndarray, p: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Weighted TP/FP/TN/FN per row of `w`; COVID-19 is predicted when p >= threshold."""
    pos = np.asarray(y, dtype=bool)
    pred = np.asarray(p) >= threshold
    return {
        name: w @ mask.astype(w.dtype)
        for name, mask in (
            ("tp", pos & pred),
            ("fp", ~pos & pred),
            ("tn", ~pos & ~pred),
            ("fn", pos & ~pred),
        )
    }


def threshold_metrics(
    w: np.ndarray, y: np.ndarray, p: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    c = confusion_counts(w, y, p, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def score_metrics(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """ROC-AUC (Mann-Whitney, ties count half), average precision, Brier score and ECE.

    Computed in `w`'s dtype: float32 weights (the bootstrap's) halve the memory traffic.
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=w.dtype)
    total = w.sum(axis=1)
    # Group tied scores: ROC ties count one half, and PR treats a tie as one threshold.
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ws = w[:, order]
    pos = np.add.reduceat(ws * y[order], starts, axis=1)
    neg = np.add.reduceat(ws * (1.0 - y[order]), starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    both = (n_pos > 0) & (n_neg > 0)
    below = np.cumsum(neg, axis=1) - neg
    auc = _ratio((pos * (below + 0.5 * neg)).sum(axis=1), n_pos * n_neg)
    tp = np.cumsum(pos[:, ::-1], axis=1)
    fp = np.cumsum(neg[:, ::-1], axis=1)
    precision = _ratio(tp, tp + fp)
    ap = _ratio(np.nansum(pos[:, ::-1] * precision, axis=1), n_pos)
    residual = (y - p)[:, None] * (bin_index(p, ECE_BINS)[:, None] == np.arange(ECE_BINS))
    return {
        "roc_auc": np.where(both, auc, np.nan),
        "pr_auc": np.where(both, ap, np.nan),
        "brier": _ratio(w @ ((p - y) ** 2).astype(w.dtype), total),
        "ece": _ratio(np.abs(w @ residual.astype(w.dtype)).sum(axis=1), total),
    }


def _estimate(point: np.ndarray, samples: np.ndarray | None, name: str) -> Estimate:
    value = float(point[0])
    if not np.isfinite(value):
        return Estimate(None, reason=REASONS[name])
    if samples is None:
        return Estimate(value)
    return Estimate(value, percentile_ci(samples), ci_resamples=int(np.isfinite(samples).sum()))


def assess(
    y: np.ndarray,
    p: np.ndarray,
    clusters: np.ndarray,
    thresholds: Mapping[str, float],
    resamples: int = 1000,
    seed: int = 0,
) -> SubsetResult:
    """Every metric with its CI, the confusion matrix at each operating point, for one subset.

    The CIs at an operating point hold its threshold fixed: they measure the uncertainty of
    the test data, not of choosing the threshold.
    """
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0:
        raise ValueError("no scored images to assess")
    ones = np.ones((1, y.size))
    boot = resample_weights(clusters, resamples, seed) if resamples > 0 else None
    point_scores = score_metrics(ones, y, p)
    boot_scores = score_metrics(boot, y, p) if boot is not None else {}
    points = {}
    for op, threshold in thresholds.items():
        counts = confusion_counts(ones, y, p, threshold)
        point = threshold_metrics(ones, y, p, threshold)
        samples = threshold_metrics(boot, y, p, threshold) if boot is not None else {}
        points[op] = AtThreshold(
            threshold=float(threshold),
            confusion=Confusion(**{k: int(v[0]) for k, v in counts.items()}),
            metrics={
                name: _estimate(point[name], samples.get(name), name) for name in THRESHOLD_METRICS
            },
        )
    return SubsetResult(
        n=int(y.size),
        n_covid=int(y.sum()),
        n_non_covid=int(y.size - y.sum()),
        n_clusters=int(np.unique(clusters).size),
        scores={
            name: _estimate(point_scores[name], boot_scores.get(name), name)
            for name in SCORE_METRICS
        },
        operating_points=points,
    )
