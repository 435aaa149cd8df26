"""Small numeric helpers shared by training, evaluation and inference (numpy only, no torch)."""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64, without overflow for large negative logits."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))
