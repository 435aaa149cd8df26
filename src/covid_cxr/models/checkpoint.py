"""Saving and loading trained models with everything inference needs to repeat training.

A checkpoint is a `torch.save`d dict; `ModelInfo` is the part that also travels into ONNX
metadata (as JSON) so both runtimes apply the same preprocessing and threshold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covid_cxr.errors import ModelError
from covid_cxr.imaging.preprocess import PreprocessConfig


@dataclass
class ModelInfo:
    """What a trained model is and how to use it.

    thresholds: named operating points, e.g. {"default": 0.5, "youden": 0.41}.
    operating_point: the name in `thresholds` that inference and the service use.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    thresholds: dict[str, float] = field(default_factory=lambda: {"default": 0.5})
    operating_point: str = "default"
    version: str = "unversioned"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.operating_point not in self.thresholds:
            raise ModelError(
                f"operating point {self.operating_point!r} is not one of the model's thresholds "
                f"{sorted(self.thresholds)}"
            )

    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.operating_point])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        data = dict(data)
        try:
            data["preprocess"] = PreprocessConfig.from_dict(data.get("preprocess", {}))
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model info is malformed: {exc}") from exc


def save_checkpoint(path: str | Path, model: nn.Module, info: ModelInfo, **extra: Any) -> None:
    """Write model weights and `info`; `extra` (optimizer state, epoch, ...) is kept for resume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": "covid-cxr/1", "info": info.to_dict(), "state_dict": state, **extra}, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (for resuming); refuses files that are not our checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != "covid-cxr/1":
        raise ModelError(f"{path}: not a covid-cxr checkpoint (train one with `covid-cxr train`)")
    return data


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model from the registry, load its weights, and return it in eval mode."""
    from covid_cxr.models import create

    data = read_checkpoint(path)
    info = ModelInfo.from_dict(data["info"])
    model = create(info.name, **{**info.options, "pretrained": False})
    model.load_state_dict(data["state_dict"])
    model.eval()
    return model, info


def update_info(path: str | Path, **changes: Any) -> ModelInfo:
    """Change fields of a saved checkpoint's info in place (e.g. thresholds chosen by evaluate)."""
    data = read_checkpoint(path)
    info = ModelInfo.from_dict({**data["info"], **changes})
    data["info"] = info.to_dict()
    tmp = Path(path).with_suffix(Path(path).suffix + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return info
