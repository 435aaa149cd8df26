"""A new linear head over frozen features, fitted in numpy (no scikit-learn, no torch).

The adapted head keeps the base model's form, logit = w . mean_hw(features) + b, so the adapted
model is an ordinary model and its CAM stays exact. It is an L2-penalised logistic regression on
the pooled features (penalty 1 / C per coefficient on the summed log-loss, as scikit-learn's
`LogisticRegression(C=C)`). With n local images the optimal w lies in the span of the n centred
feature rows, so Newton's method runs in at most n + 1 dimensions (a thin SVD), whatever the
feature width: a fit on 100 images takes milliseconds.

Measured in benchmarks/adaptation.py before choosing this form: standardising the features,
penalising towards the base head (with the base logit as an offset), averaging over horizontal
flips and adding max pooling were each no better, or worse, on the simulated sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covid_cxr.numeric import sigmoid

_NEWTON_STEPS = 100
_TOLERANCE = 1e-8
_STEP_LIMIT = 20.0  # largest Newton step (max norm) on the logit scale, against overshoot


@dataclass(frozen=True)
class LinearHead:
    """logit = weight . pooled_features + bias."""

    weight: np.ndarray  # (d,) float64
    bias: float

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        return np.asarray(pooled, dtype=np.float64) @ self.weight + self.bias


def newton_logistic(design: np.ndarray, y: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """Coefficients minimising summed log-loss + 1/2 sum(penalty * coef^2).

    A tiny ridge on unpenalised coefficients keeps them finite on separable data.
    """
    ridge = np.maximum(np.asarray(penalty, dtype=np.float64), 1e-6)
    coef = np.zeros(design.shape[1])
    for _ in range(_NEWTON_STEPS):
        p = sigmoid(design @ coef)
        gradient = design.T @ (p - y) + ridge * coef
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + np.diag(ridge)
        step = np.linalg.solve(hessian, gradient)
        largest = np.abs(step).max()
        if largest > _STEP_LIMIT:
            step *= _STEP_LIMIT / largest
        coef -= step
        if largest < _TOLERANCE:
            break
    return coef


@dataclass(frozen=True)
class Basis:
    """Local training features prepared once for fits at several penalties."""

    mean: np.ndarray  # (d,)
    directions: np.ndarray  # (r, d) orthonormal rows spanning the centred features
    projected: np.ndarray  # (n, r)

    @classmethod
    def of(cls, pooled: np.ndarray) -> Basis:
        """From the eigenvectors of the n x n Gram matrix: far cheaper than an SVD of the
        n x d features when d (1280) is much larger than n."""
        pooled = np.asarray(pooled, dtype=np.float64)
        mean = pooled.mean(axis=0)
        centred = pooled - mean
        eigenvalues, vectors = np.linalg.eigh(centred @ centred.T)
        keep = eigenvalues > max(eigenvalues.max(initial=0.0), 1e-300) * 1e-12
        singular = np.sqrt(eigenvalues[keep])
        projected = vectors[:, keep] * singular
        return cls(mean, (centred.T @ vectors[:, keep] / singular).T, projected)


def fit_head(basis: Basis, y: np.ndarray, c: float) -> LinearHead:
    """The L2 logistic regression at inverse penalty `c`, folded back into w . x + b."""
    n, r = basis.projected.shape
    design = np.hstack([np.ones((n, 1)), basis.projected])
    coef = newton_logistic(design, np.asarray(y, dtype=np.float64), np.r_[0.0, np.full(r, 1 / c)])
    weight = coef[1:] @ basis.directions
    return LinearHead(weight, float(coef[0] - weight @ basis.mean))
