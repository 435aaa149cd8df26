"""What an exported ONNX model carries besides its graph, and the names inside that graph.

`covid_cxr_info` is the ModelInfo JSON (preprocessing, thresholds, version), so ONNX Runtime
repeats exactly what training did; `covid_cxr_cam_head` holds the linear head over the pooled
`features` output, from which CAM (= Grad-CAM for such a head) is computed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covid_cxr.errors import ModelError

if TYPE_CHECKING:
    from covid_cxr.models.info import ModelInfo

INPUT = "image"
LOGIT = "logit"
FEATURES = "features"
INFO_KEY = "covid_cxr_info"
CAM_HEAD_KEY = "covid_cxr_cam_head"


@dataclass(frozen=True)
class CamHead:
    """logit = weight . mean_hw(features) + bias."""

    weight: np.ndarray
    bias: float

    def to_json(self) -> str:
        return json.dumps({"weight": self.weight.tolist(), "bias": self.bias})


def parse_metadata(meta: Mapping[str, str], source: str) -> tuple[ModelInfo, CamHead | None]:
    """ModelInfo and CAM head from metadata_props as a key -> value mapping."""
    from covid_cxr.models.info import ModelInfo

    if INFO_KEY not in meta:
        raise ModelError(
            f"{source}: ONNX model without covid-cxr metadata ({INFO_KEY!r}); export it with "
            "`covid-cxr export` so its preprocessing and threshold travel with it"
        )
    try:
        info = ModelInfo.from_dict(json.loads(meta[INFO_KEY]))
        head = None
        if CAM_HEAD_KEY in meta:
            data = json.loads(meta[CAM_HEAD_KEY])
            head = CamHead(np.asarray(data["weight"], np.float32), float(data["bias"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{source}: damaged covid-cxr metadata ({exc})") from exc
    return info, head


def set_metadata(proto: Any, info: ModelInfo, cam_head: CamHead | None) -> None:
    """Write ModelInfo (and the CAM head) into an onnx.ModelProto's metadata_props."""
    entries = {INFO_KEY: info.to_json()}
    if cam_head is not None:
        entries[CAM_HEAD_KEY] = cam_head.to_json()
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | Path) -> tuple[ModelInfo, CamHead | None]:
    """ModelInfo and CAM head of an exported file, without starting a runtime."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({exc})") from exc
    return parse_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def update_onnx_info(path: str | Path, **changes: Any) -> ModelInfo:
    """Change fields of an exported model's ModelInfo in place (atomically); the graph and the
    CAM head stay as they are."""
    import onnx

    from covid_cxr.fileio import atomic_path
    from covid_cxr.models.info import ModelInfo

    info, head = read_metadata(path)
    info = ModelInfo.from_dict({**info.to_dict(), **changes})
    proto = onnx.load(str(path))
    set_metadata(proto, info, head)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return info
