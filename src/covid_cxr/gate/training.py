"""Training the input gate: which images are in scope, their encoder features (cached), a
logistic head, its threshold, and the ONNX export. Imports torch; never used at run time.

In scope: frontal radiographs of every shared source. The main sources keep the patient-level
split of `covid-cxr data build --recipe configs/data/default.toml`; JSRT and OpenIST (one
image per patient, no ids for OpenIST) get a 70/15/15 split from a hash of the file name.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.gate.model import INPUT, SCORE, GateInfo, metadata_props
from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph

GATE_PREPROCESS = PreprocessConfig(size=128, intensity="equalize", crop=1.0)
EXTRA_SOURCES = {"jsrt": "jsrt/images", "openist": "openist-normal/images"}


@dataclass(frozen=True)
class Example:
    """One image for the gate: in scope (a frontal radiograph) or not, and its split."""

    path: Path
    in_scope: bool
    kind: str  # the source for radiographs, the out-of-scope kind otherwise
    split: str  # train, val or test (out-of-scope pictures: train or test)
    group: str  # patient or picture: what must not straddle splits


def hashed_split(key: str) -> str:
    value = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if value < 0.7 else "val" if value < 0.85 else "test"


def radiographs(manifest: Path, root: Path) -> list[Example]:
    """Frontal radiographs of every shared source with their patient-level split."""
    with manifest.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    examples = [
        Example(root / r["path"], True, r["source"], r["split"], r["patient_id"]) for r in rows
    ]
    for source, folder in EXTRA_SOURCES.items():
        for path in sorted((root / folder).glob("*")):
            if path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
                examples.append(Example(path, True, source, hashed_split(path.stem), path.stem))
    return examples


def out_of_scope(index: list[dict[str, str]]) -> list[Example]:
    return [Example(Path(r["path"]), False, r["kind"], r["split"], r["origin"]) for r in index]


def encoder() -> object:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (the gate's frozen encoder)."""
    from covid_cxr.models.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0(pretrained=True).eval()


def extract_features(paths: Sequence[Path], *, batch_size: int = 64) -> np.ndarray:
    """Pooled 1280-channel encoder features of each image as the gate will see it."""
    import torch

    model = encoder()
    out = np.zeros((len(paths), 1280), np.float32)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch = np.stack([preprocess(read_radiograph(p).pixels, GATE_PREPROCESS) for p in chunk])
        with torch.inference_mode():
            x = torch.from_numpy(batch[:, None])
            out[start : start + len(chunk)] = model.features(x).mean((2, 3)).numpy()
    return out


@dataclass(frozen=True)
class Head:
    """logit(in scope) = weight . features + bias (standardisation folded in)."""

    weight: np.ndarray
    bias: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight + self.bias


def fit_head(features: np.ndarray, in_scope: np.ndarray, *, c: float = 0.05) -> Head:
    """L2 logistic regression on standardised features, classes weighted equally."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(0), features.std(0) + 1e-6
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
    model.fit((features - mean) / scale, in_scope.astype(int))
    weight = model.coef_[0] / scale
    return Head(weight.astype(np.float32), float(model.intercept_[0] - weight @ mean))


def export_gate(head: Head, info: GateInfo, out: Path, extra: dict[str, object]) -> None:
    """Encoder + head as one ONNX graph (dynamic batch), its GateInfo in the metadata."""
    import onnx
    import torch
    from torch import nn

    from covid_cxr.fileio import atomic_write_bytes

    class GateNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder()
            self.head = nn.Linear(1280, 1)
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(head.weight)[None])
                self.head.bias.fill_(head.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder.features(x).mean((2, 3))).squeeze(1)

    size = info.preprocess.size
    program = torch.onnx.export(
        GateNet().eval(),
        (torch.rand(2, 1, size, size),),
        input_names=[INPUT],
        output_names=[SCORE],
        opset_version=18,
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
    )
    program.optimize()
    model = program.model_proto
    for key, value in metadata_props(info, extra).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    atomic_write_bytes(out, model.SerializeToString())
