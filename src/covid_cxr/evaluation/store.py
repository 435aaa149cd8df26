"""Write chosen operating points into the model file itself.

Inference and the service read `ModelInfo.threshold` (= thresholds[operating_point]) from the
model they load, so storing the thresholds here is what changes their decisions. A checkpoint
is updated with `update_info`; an ONNX file gets its `covid_cxr_info` metadata rewritten.
Export copies a checkpoint's info, so thresholds stored before `covid-cxr export` travel on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from covid_cxr.errors import ModelError
from covid_cxr.fileio import atomic_path
from covid_cxr.models.checkpoint import ModelInfo, update_info


def store_thresholds(
    path: Path, thresholds: Mapping[str, float], operating_point: str
) -> ModelInfo:
    if operating_point not in thresholds:
        raise ModelError(
            f"operating point {operating_point!r} is not among {sorted(thresholds)}; "
            "choose one of those with --operating-point"
        )
    changes = {"thresholds": dict(thresholds), "operating_point": operating_point}
    if path.suffix.lower() != ".onnx":
        return update_info(path, **changes)
    import onnx

    from covid_cxr.inference.metadata import read_metadata, set_metadata

    info, head = read_metadata(path)
    info = ModelInfo.from_dict({**info.to_dict(), **changes})
    proto = onnx.load(str(path))
    set_metadata(proto, info, head)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return info
