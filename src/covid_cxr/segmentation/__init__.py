"""Lung segmentation: `LungSegmenter` (ONNX Runtime, no torch) and its typed `LungMask`."""

from covid_cxr.segmentation.masks import LungMask
from covid_cxr.segmentation.segmenter import LungSegmenter

__all__ = ["LungMask", "LungSegmenter"]
