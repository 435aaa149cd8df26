"""Calibration: does a predicted 0.8 come true 80% of the time?

Binning (shared by the expected calibration error and the reliability diagram): 10
equal-width bins over [0, 1], [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]; a probability of exactly
1.0 falls in the last bin.
"""

from __future__ import annotations

import numpy as np

from covid_cxr.evaluation.result import ReliabilityBin

ECE_BINS = 10


def bin_index(probabilities: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin of each probability, 0 .. bins-1."""
    return np.clip((np.asarray(probabilities) * bins).astype(np.int64), 0, bins - 1)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Per bin: its range, image count, mean predicted probability and observed COVID rate."""
    index = bin_index(p, bins)
    table = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        table.append(
            ReliabilityBin(
                lower=b / bins,
                upper=(b + 1) / bins,
                count=count,
                mean_probability=float(p[inside].mean()) if count else None,
                fraction_covid=float(y[inside].mean()) if count else None,
            )
        )
    return table
