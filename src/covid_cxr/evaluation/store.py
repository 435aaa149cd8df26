"""Write chosen operating points into the model file itself: a step of its own, after
`evaluate()`, so that evaluating never changes a model file unless asked to.

Inference and the service read `ModelInfo.threshold` (= thresholds[operating_point]) from the
model they load, so storing the thresholds here is what changes their decisions. A checkpoint
is updated with `update_info` (torch, imported only then); an ONNX file gets its
`covid_cxr_info` metadata rewritten. Export copies a checkpoint's info, so thresholds stored
before `covid-cxr export` travel on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from covid_cxr.errors import ModelError
from covid_cxr.models.info import ModelInfo


def store_thresholds(
    path: Path, thresholds: Mapping[str, float], operating_point: str
) -> ModelInfo:
    if operating_point not in thresholds:
        raise ModelError(
            f"operating point {operating_point!r} is not among {sorted(thresholds)}; "
            "choose one of those with --operating-point"
        )
    changes = {"thresholds": dict(thresholds), "operating_point": operating_point}
    if path.suffix.lower() == ".onnx":
        from covid_cxr.inference.metadata import update_onnx_info

        return update_onnx_info(path, **changes)
    from covid_cxr.models.checkpoint import update_info

    return update_info(path, **changes)
