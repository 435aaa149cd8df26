"""Run a model over labelled rows: probabilities for the readable images, reasons for the rest.

Decoding, preprocessing and batching are the inference stage's (`predict_files`), so an
evaluated model sees exactly what `covid-cxr predict` and the service would feed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from covid_cxr.data.manifest import ManifestRow
from covid_cxr.evaluation.attention import cam_share_in_lungs
from covid_cxr.inference.batch import Failure, predict_files
from covid_cxr.inference.predictor import Prediction, Predictor

if TYPE_CHECKING:
    from covid_cxr.segmentation import LungSegmenter


@dataclass
class Scored:
    """The rows that produced a probability, and the ones that could not be read (with why)."""

    rows: list[ManifestRow] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    unreadable: list[Failure] = field(default_factory=list)
    # Share of each image's Grad-CAM mass inside its lungs (NaN: not measured).
    cam_in_lungs: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def targets(self) -> np.ndarray:
        return np.array([row.target for row in self.rows], dtype=np.int64)


def score_rows(
    predictor: Predictor,
    rows: Sequence[ManifestRow],
    *,
    desc: str = "scoring",
    workers: int = 2,
    batch_size: int = 32,
    lungs: LungSegmenter | None = None,
) -> Scored:
    """Probabilities of the readable rows; with `lungs`, also where each Grad-CAM map lies."""
    scored = Scored()
    probabilities: list[float] = []
    shares: list[float] = []
    results = predict_files(
        predictor,
        [row.path for row in rows],
        batch_size=batch_size,
        workers=workers,
        cam=lungs is not None,
    )
    with tqdm(total=len(rows), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for row, (_, result) in zip(rows, results, strict=True):
            if isinstance(result, Failure):
                scored.unreadable.append(result)
                bar.set_postfix(unreadable=len(scored.unreadable), refresh=False)
            else:
                scored.rows.append(row)
                probabilities.append(result.probability)
                shares.append(_share(predictor, result, lungs))
            bar.update()
    scored.probabilities = np.asarray(probabilities, dtype=np.float64)
    scored.cam_in_lungs = np.asarray(shares, dtype=np.float64)
    return scored


def _share(predictor: Predictor, result: Prediction, lungs: LungSegmenter | None) -> float:
    if lungs is None or result.cam is None:
        return float("nan")
    mask = lungs.segment(result.radiograph).mask
    return cam_share_in_lungs(result.cam, mask, predictor.info.preprocess.crop, box=result.box)
