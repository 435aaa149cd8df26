"""Model inputs for classifiers whose preprocessing crops to the lungs.

`model_input` is the one place that decides whether a radiograph needs its lung mask, runs the
segmenter only then, and returns the input together with the box it covers (where Grad-CAM
maps go back). Predictor, training's cache, export and evaluation all call it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from covid_cxr.errors import RadiographError
from covid_cxr.imaging.preprocess import Box, PreprocessConfig, input_box, preprocess
from covid_cxr.segmentation.segmenter import LungSegmenter


class NoLungsError(RadiographError):
    """The model crops to the lungs, but the lung segmenter found none in this image."""


@dataclass(frozen=True)
class ModelInput:
    """A (size, size) float32 model input and the (top, left, height, width) box it covers."""

    pixels: np.ndarray
    box: Box


@functools.cache
def shared_segmenter() -> LungSegmenter:
    """The shipped lung segmenter, loaded once per process (training and export workers)."""
    return LungSegmenter()


def model_input(
    pixels: np.ndarray,
    config: PreprocessConfig,
    segmenter: LungSegmenter | None = None,
    *,
    source: str = "<pixels>",
) -> ModelInput:
    """Preprocess a (H, W) radiograph as `config` says, segmenting its lungs only if needed.

    `segmenter`: used when `config.lungs` is not "off"; None means the shared shipped one.
    Raises NoLungsError (naming `source`) when the segmenter finds no lung fields.
    """
    if not config.needs_lungs:
        return ModelInput(preprocess(pixels, config), input_box(pixels.shape, config))
    found = (segmenter or shared_segmenter()).segment(pixels)
    if found.bbox is None:
        raise NoLungsError(
            source,
            "no lung fields found; this model crops its input to the lungs",
            "give a frontal chest radiograph with the lungs visible",
        )
    return ModelInput(
        preprocess(pixels, config, found.mask), input_box(pixels.shape, config, found.mask)
    )
