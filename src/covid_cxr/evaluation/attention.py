"""Where the model looks: the share of its Grad-CAM mass that falls inside the lungs.

A number for "does it look at the lungs, or at markers, borders, the shoulders and age?". The
map covers the model's box on the radiograph (central or lung crop); it is resized to that
box, the rest of the radiograph gets no mass, and the lung mask comes from the shipped lung
segmenter at the radiograph's own size. A map with no positive evidence anywhere has no share (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from covid_cxr.data.manifest import ManifestRow
from covid_cxr.evaluation.bootstrap import cluster_ids, percentile_ci, resample_weights
from covid_cxr.evaluation.result import Estimate
from covid_cxr.imaging.preprocess import Box, crop_box

ALL = "all"


def cam_share_in_lungs(
    cam: np.ndarray, lungs: np.ndarray, crop: float = 1.0, *, box: Box | None = None
) -> float:
    """Fraction of the map's mass on lung pixels; `lungs` is the radiograph-sized mask.

    The map covers `box` (`Prediction.box`), or else the central `crop` fraction."""
    top, left, ch, cw = box if box is not None else crop_box(*lungs.shape, crop)
    heat = np.asarray(
        Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32)).resize(
            (cw, ch), Image.Resampling.BILINEAR
        )
    )
    heat = np.clip(heat, 0.0, None)
    total = float(heat.sum())
    if total <= 0.0:
        return float("nan")
    inside = float(heat[lungs[top : top + ch, left : left + cw]].sum())
    return inside / total


def summarise(
    shares: np.ndarray, rows: Sequence[ManifestRow], resamples: int, seed: int
) -> dict[str, Estimate]:
    """Mean share with a 95% CI (patients resampled), for all images and per source."""
    shares = np.asarray(shares, dtype=np.float64)
    sources = np.array([r.source for r in rows])
    out = {}
    for name in (ALL, *sorted(set(sources.tolist()))):
        keep = np.isfinite(shares) & ((sources == name) if name != ALL else True)
        if not keep.any():
            out[name] = Estimate(None, reason="no image with a Grad-CAM map and a lung mask")
            continue
        chosen = [r for r, k in zip(rows, keep, strict=True) if k]
        values = shares[keep]
        estimate = Estimate(float(values.mean()))
        if resamples > 0:
            clusters = cluster_ids([r.patient_id for r in chosen], [r.source for r in chosen])
            weights = resample_weights(clusters, resamples, seed)
            means = (weights @ values) / np.maximum(weights.sum(axis=1), 1e-12)
            estimate = Estimate(estimate.value, percentile_ci(means), ci_resamples=resamples)
        out[name] = estimate
    return out
