"""The input gate at run time: DICOM header rules, then a small image classifier that says
whether the pixels are a frontal chest radiograph, in front of every prediction.

The classifier (`covid_cxr/shipped/covid-cxr-gate.onnx`) is EfficientNet-Lite0's ImageNet
encoder at 128 px with a logistic head trained on radiographs of every shared source against
out-of-scope pictures (`covid_cxr.gate.training`); its metadata carries its input size,
intensity handling and the threshold below which an image is refused. No torch at run time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr.errors import ModelError, OutOfScopeError
from covid_cxr.gate.header import BYPASS, GATE_ENV, age_warning, check_header
from covid_cxr.imaging import Radiograph, preprocess
from covid_cxr.imaging.preprocess import PreprocessConfig
from covid_cxr.paths import shipped_model

GATE_MODEL = shipped_model("covid-cxr-gate.onnx")
META_KEY = "covid_cxr_gate"
INPUT, SCORE = "image", "logit"
_OFF = frozenset({"off", "0", "false", "no"})
BYPASS_HINT = f"upload a frontal (PA or AP) chest radiograph; {BYPASS}"


@dataclass(frozen=True)
class GateInfo:
    """What the gate model needs besides its graph (stored in its ONNX metadata)."""

    version: str
    preprocess: PreprocessConfig
    threshold: float  # refuse when P(frontal chest radiograph) is below this

    def to_json(self) -> str:
        data = {"version": self.version, "threshold": self.threshold}
        return json.dumps({**data, "preprocess": self.preprocess.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> GateInfo:
        data = json.loads(text)
        return cls(
            version=str(data["version"]),
            preprocess=PreprocessConfig.from_dict(data["preprocess"]),
            threshold=float(data["threshold"]),
        )


@dataclass(frozen=True)
class GateResult:
    """An image the gate let through: the classifier's score and warnings to show beside it."""

    score: float  # P(frontal chest radiograph) from the image classifier
    warnings: tuple[str, ...]
    ms: float  # the gate's own cost, header rules and classifier together


def gate_enabled(gate: bool | None) -> bool:
    """True unless switched off: gate=False, or gate=None and $COVID_CXR_GATE=off."""
    if gate is not None:
        return gate
    return os.environ.get(GATE_ENV, "on").strip().lower() not in _OFF


class InputGate:
    """Refuses what the model cannot judge; one instance is shared by every thread."""

    def __init__(self, path: str | Path | None = None, *, threads: int = 1) -> None:
        import onnxruntime as ort

        from covid_cxr.inference.runtime import session_options

        self.path = Path(path) if path is not None else GATE_MODEL
        if not self.path.is_file():
            raise ModelError(
                f"{self.path}: the input gate model is missing (reinstall covid-cxr, or switch "
                f"the gate off for research with --no-gate / {GATE_ENV}=off)"
            )
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
            )
            meta = self.session.get_modelmeta().custom_metadata_map
            self.info = GateInfo.from_json(meta[META_KEY])
        except Exception as exc:
            raise ModelError(f"{self.path}: not a covid-cxr input gate model ({exc})") from exc

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits of P(frontal chest radiograph) for gate inputs (N, S, S) from `prepare`."""
        (logits,) = self.session.run([SCORE], {INPUT: batch[:, None].astype(np.float32)})
        return logits.reshape(-1)

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """P(frontal chest radiograph) for gate inputs (N, S, S) from `prepare`."""
        from covid_cxr.numeric import sigmoid

        return sigmoid(self.logits(batch))

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return preprocess(pixels, self.info.preprocess)

    def check(self, radiograph: Radiograph) -> GateResult:
        """GateResult for an image in scope; OutOfScopeError saying why for one that is not."""
        start = time.perf_counter()
        check_header(radiograph.dataset, radiograph.source)
        score = float(self.scores(self.prepare(radiograph.pixels)[None])[0])
        if score < self.info.threshold:
            raise OutOfScopeError(
                radiograph.source,
                "out of scope: not a frontal chest radiograph (the input check gives it "
                f"{score:.1%}, below the {self.info.threshold:.1%} it requires)",
                BYPASS_HINT,
            )
        warning = age_warning(radiograph.dataset)
        ms = (time.perf_counter() - start) * 1000.0
        return GateResult(score, (warning,) if warning else (), ms)


def metadata_props(info: GateInfo, extra: dict[str, Any]) -> dict[str, str]:
    """The ONNX metadata the gate model carries: its GateInfo and how it was made."""
    return {META_KEY: info.to_json(), "covid_cxr_gate_training": json.dumps(extra)}
