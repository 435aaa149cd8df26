"""Cross-validation by patient: the honest local figures, and the choice of penalty.

Every prediction reported for a local image comes from a head fitted without that image's
patient. The penalty of each of those heads is itself chosen by an inner cross-validation on
its own training part (nested), so the reported AUC of the adapted head is not tuned on the
images it is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from covid_cxr.adaptation.head import Basis, fit_head
from covid_cxr.errors import DataError
from covid_cxr.evaluation.metrics import score_metrics

# Inverse penalties tried (scikit-learn's C); 1 is scikit-learn's default.
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MAX_FOLDS = 5


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of one set of scores (NaN with a single class)."""
    ones = np.ones((1, len(y)))
    return float(score_metrics(ones, np.asarray(y), np.asarray(scores))["roc_auc"][0])


def patient_folds(y: np.ndarray, clusters: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number per image: whole patients per fold, each class spread evenly over folds.

    A patient counts for the class of their first image (patients with images of both classes
    are rare: a follow-up after recovery).
    """
    rng = np.random.default_rng(seed)
    ids, first = np.unique(clusters, return_index=True)
    fold_of = np.empty(ids.size, dtype=np.int64)
    start = 0
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(y[first] == label))
        fold_of[members] = (np.arange(members.size) + start) % k
        start += members.size
    return fold_of[np.searchsorted(ids, clusters)]


def fold_count(y: np.ndarray, clusters: np.ndarray) -> int:
    """As many folds as the rarer class has patients, at most MAX_FOLDS, at least 2."""
    _, first = np.unique(clusters, return_index=True)
    per_class = min(int((y[first] == label).sum()) for label in (0, 1))
    return max(2, min(MAX_FOLDS, per_class))


def out_of_fold(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, grid: tuple[float, ...]
) -> np.ndarray:
    """(len(grid), n) logits, each image scored by heads fitted without its fold."""
    logits = np.zeros((len(grid), y.size))
    for fold in np.unique(folds):
        test = folds == fold
        basis = Basis.of(x[~test])
        for i, c in enumerate(grid):
            logits[i, test] = fit_head(basis, y[~test], c).logits(x[test])
    return logits


def choose_c(x: np.ndarray, y: np.ndarray, clusters: np.ndarray, seed: int) -> float:
    """The inverse penalty with the best inner cross-validated AUC (the smaller on ties)."""
    folds = patient_folds(y, clusters, fold_count(y, clusters), seed)
    with threadpool_limits(limits=1, user_api="blas"):
        logits = out_of_fold(x, y, folds, C_GRID)
    aucs = np.array([roc_auc(y, row) for row in logits])
    return C_GRID[int(np.nanargmax(np.where(np.isnan(aucs), -1.0, aucs)))]


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold logits of the adapted head (averaged over repeats) and the C chosen in each
    outer fold; `folds` and `repeats` describe the outer loop."""

    logits: np.ndarray
    chosen_c: list[float]
    folds: int
    repeats: int


def cross_validate(
    x: np.ndarray, y: np.ndarray, clusters: np.ndarray, repeats: int, seed: int
) -> CrossValidation:
    """Repeated stratified k-fold by patient, with the penalty chosen inside each fold.

    BLAS runs single-threaded here: the matrices are small (n x n), and multi-threaded
    OpenBLAS was 20-40x slower on a busy 2-core machine.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _cross_validate(x, y, clusters, repeats, seed)


def _cross_validate(
    x: np.ndarray, y: np.ndarray, clusters: np.ndarray, repeats: int, seed: int
) -> CrossValidation:
    k = fold_count(y, clusters)
    total = np.zeros(y.size)
    chosen: list[float] = []
    for repeat in range(repeats):
        folds = patient_folds(y, clusters, k, seed + 1000 * repeat)
        for fold in range(k):
            test = folds == fold
            train = ~test
            if min(int((y[train] == label).sum()) for label in (0, 1)) < 2:
                raise DataError(
                    "cross-validation left a training fold without one class: some patients "
                    "have radiographs of both classes; give each patient one label"
                )
            c = choose_c(x[train], y[train], clusters[train], seed + repeat)
            chosen.append(c)
            total[test] += fit_head(Basis.of(x[train]), y[train], c).logits(x[test])
    return CrossValidation(total / repeats, chosen, k, repeats)
