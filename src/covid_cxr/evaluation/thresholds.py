"""Operating points chosen on validation data, never on the data they are reported on.

COVID-19 is predicted when probability >= threshold; candidate thresholds are the observed
validation probabilities (every distinct cut of the ROC curve).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from covid_cxr.errors import DataError

DEFAULT_THRESHOLD = 0.5
BALANCED_YOUDEN = "youden_balanced"


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    if not (y == 1).any() or not (y == 0).any():
        raise DataError(
            "validation data must contain both COVID-19 and non-COVID images to choose a "
            f"threshold (got {int(y.sum())} COVID-19 of {y.size}); pass --threshold-from "
            "with a labelled set holding both classes"
        )
    return y, p


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1; the highest one on ties."""
    y, p = _check(y, p)
    candidates = np.unique(p)[::-1]
    pred = p[None, :] >= candidates[:, None]
    sensitivity = (pred & (y == 1)).sum(axis=1) / (y == 1).sum()
    specificity = (~pred & (y == 0)).sum(axis=1) / (y == 0).sum()
    return float(candidates[int(np.argmax(sensitivity + specificity))])


def balanced_youden_threshold(y: np.ndarray, p: np.ndarray, groups: Sequence[str]) -> float:
    """Youden's J with every (group, class) counting equally: sensitivity averaged over the
    groups' COVID-19 images, specificity over their non-COVID images.

    With one group per source, a collection of 900 children no longer decides where the
    threshold of every adult hospital lies (plain Youden on such data put it where half of an
    unseen hospital's normal adults were called COVID-19).
    """
    y, p = _check(y, p)
    groups = np.asarray(groups)
    candidates = np.unique(p)[::-1]
    pred = p[None, :] >= candidates[:, None]
    sensitivity, specificity = [], []
    for group in np.unique(groups):
        for target, rates in ((1, sensitivity), (0, specificity)):
            members = (groups == group) & (y == target)
            if members.any():
                hit = pred[:, members].mean(axis=1)
                rates.append(hit if target else 1.0 - hit)
    score = np.mean(sensitivity, axis=0) + np.mean(specificity, axis=0)
    return float(candidates[int(np.argmax(score))])


def sensitivity_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches `target` (the most specific such)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, p = _check(y, p)
    positives = np.sort(p[y == 1])[::-1]
    needed = math.ceil(target * positives.size - 1e-9)
    return float(positives[needed - 1])


def sensitivity_name(target: float) -> str:
    return f"sensitivity_{target * 100:g}"


def choose_operating_points(
    y: np.ndarray,
    p: np.ndarray,
    target_sensitivity: float = 0.95,
    groups: Sequence[str] | None = None,
) -> dict[str, float]:
    """{"default": 0.5, "youden": ..., "sensitivity_95": ...} from validation labels/scores,
    plus "youden_balanced" when the images' groups (sources) are given and there are several."""
    points = {
        "default": DEFAULT_THRESHOLD,
        "youden": youden_threshold(y, p),
        sensitivity_name(target_sensitivity): sensitivity_threshold(y, p, target_sensitivity),
    }
    if groups is not None and len(set(groups)) > 1:
        points[BALANCED_YOUDEN] = balanced_youden_threshold(y, p, groups)
    return points
