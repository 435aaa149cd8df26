"""Training the input gate: which images are in scope, their encoder features (cached), a
logistic head, its threshold, and the ONNX export. Imports torch; never used at run time.

In scope: frontal radiographs of every shared source (ieee8023, Kaggle, NIH, Hannover, JSRT,
OpenIST) with the patient-level split of `covid-cxr data build --recipe
configs/data/default.toml`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.gate.model import INPUT, SCORE, GateInfo, metadata_props
from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph

GATE_PREPROCESS = PreprocessConfig(size=128, intensity="equalize", crop=1.0)


@dataclass(frozen=True)
class Example:
    """One image for the gate: in scope (a frontal radiograph) or not, and its split."""

    path: Path
    in_scope: bool
    kind: str  # the source for radiographs, the out-of-scope kind otherwise
    split: str  # train, val or test (out-of-scope pictures: train or test)
    group: str  # patient or picture: what must not straddle splits


def radiographs(manifest: Path, root: Path) -> list[Example]:
    """Frontal radiographs of every shared source with their patient-level split."""
    with manifest.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [Example(root / r["path"], True, r["source"], r["split"], r["patient_id"]) for r in rows]


def out_of_scope(index: list[dict[str, str]]) -> list[Example]:
    return [Example(Path(r["path"]), False, r["kind"], r["split"], r["origin"]) for r in index]


def encoder() -> object:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (the gate's frozen encoder)."""
    from covid_cxr.models.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0(pretrained=True).eval()


def pooled_encoder() -> object:
    """The frozen encoder's pooled (N, 1280) features as a torch module, for export."""
    import torch
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder.features(x).mean((2, 3))

    return Pooled().eval()


def _export(module: object, out: Path, size: int, extra: dict[str, str] | None = None) -> None:
    """A (N, 1, size, size) -> output module as ONNX with a dynamic batch axis."""
    import onnx
    import torch

    from covid_cxr.fileio import atomic_write_bytes

    program = torch.onnx.export(
        module,
        (torch.rand(2, 1, size, size),),
        input_names=[INPUT],
        output_names=[SCORE],
        opset_version=18,
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
    )
    program.optimize()
    model = program.model_proto
    for key, value in (extra or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    atomic_write_bytes(out, model.SerializeToString())


def extract_features(
    paths: Sequence[Path], work: Path, *, batch_size: int = 32
) -> Iterator[tuple[Sequence[Path], np.ndarray]]:
    """Pooled 1280-channel encoder features of each image as the gate will see it, in chunks
    of 512 (so a caller can cache progress). Runs the encoder exported to ONNX: several times
    faster than eager PyTorch on this CPU."""
    import onnxruntime as ort

    from covid_cxr.inference.runtime import session_options

    encoder_onnx = work / "encoder.onnx"
    if not encoder_onnx.is_file():
        _export(pooled_encoder(), encoder_onnx, GATE_PREPROCESS.size)
    session = ort.InferenceSession(
        str(encoder_onnx), session_options(1), providers=["CPUExecutionProvider"]
    )
    for chunk_start in range(0, len(paths), 512):
        chunk = paths[chunk_start : chunk_start + 512]
        out = np.zeros((len(chunk), 1280), np.float32)
        for start in range(0, len(chunk), batch_size):
            part = chunk[start : start + batch_size]
            pixels = [preprocess(read_radiograph(p).pixels, GATE_PREPROCESS) for p in part]
            batch = np.stack(pixels)[:, None].astype(np.float32)
            (out[start : start + len(part)],) = session.run([SCORE], {INPUT: batch})
        yield chunk, out


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
    import torch
    from torch import nn

    class GateNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pooled = pooled_encoder()
            self.head = nn.Linear(1280, 1)
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(head.weight)[None])
                self.head.bias.fill_(head.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pooled(x)).squeeze(1)

    _export(GateNet().eval(), out, info.preprocess.size, metadata_props(info, extra))
