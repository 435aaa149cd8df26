"""Lung segmentation: `LungSegmenter` (ONNX Runtime, no torch) and its typed `LungMask`.

Imported lazily, so that registering the `segment` commands keeps `covid-cxr --help` instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from covid_cxr.segmentation.inputs import ModelInput, NoLungsError, model_input
    from covid_cxr.segmentation.masks import LungMask
    from covid_cxr.segmentation.segmenter import LungSegmenter

__all__ = ["LungMask", "LungSegmenter", "ModelInput", "NoLungsError", "model_input"]


def __getattr__(name: str) -> Any:
    if name == "LungMask":
        from covid_cxr.segmentation.masks import LungMask

        return LungMask
    if name == "LungSegmenter":
        from covid_cxr.segmentation.segmenter import LungSegmenter

        return LungSegmenter
    if name in ("ModelInput", "NoLungsError", "model_input"):
        from covid_cxr.segmentation import inputs

        return getattr(inputs, name)
    raise AttributeError(f"module 'covid_cxr.segmentation' has no attribute {name!r}")
