"""What a trained model is and how to use it, without importing torch.

`ModelInfo` travels inside checkpoints and, as JSON, inside ONNX metadata, so both runtimes
apply the same preprocessing and threshold; an ONNX-only Predictor never loads torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

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
