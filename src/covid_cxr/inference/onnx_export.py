"""PyTorch -> ONNX: the graph, the ModelInfo in its metadata, and what CAM needs.

The exporter is torch.export-based (`dynamo=True`) with its graph optimiser on (without it
EfficientNet-Lite0 ran 4x slower in ONNX Runtime: 542 nodes, padding and batch norm unfused).
The legacy TorchScript exporter is deprecated in torch 2.13, and it traces the TensorFlow-style
'SAME' padding as run-time shape arithmetic (458 nodes against 145), which ran 25% slower.
Opset 18 is what the exporter writes natively (its down-conversion to 17 fails on ReduceMean's
axes input).

The graph has a dynamic batch axis and a fixed image size (the model's PreprocessConfig.size),
and two outputs: `logit` (N,) and, when the head is global-average-pool -> linear, `features`
(N, C, h, w), the `cam_layer` activations. Features are on the path to the logit anyway, so
they cost nothing unless asked for; with the head's weights (kept in the metadata) they give
CAM, which for such a head is exactly Grad-CAM.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.errors import ModelError
from covid_cxr.fileio import atomic_path
from covid_cxr.inference.metadata import FEATURES, INPUT, LOGIT, CamHead, set_metadata
from covid_cxr.models.checkpoint import ModelInfo

OPSET = 18
_HEAD_TOLERANCE = 1e-4


class _WithFeatures(nn.Module):
    """Returns (logits, cam_layer activations); the hook lives only for one forward call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        layer = self.model.cam_layer
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, captured[-1]


def sample_batch(info: ModelInfo, n: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = info.preprocess.size
    return torch.rand(n, 1, size, size, generator=generator)


def find_cam_head(model: nn.Module, batch: torch.Tensor) -> CamHead | None:
    """The linear head over pooled cam-layer features, if the model has one.

    Found by checking the arithmetic rather than trusting names: the last Linear(C, 1) must
    reproduce the model's logits from the spatial mean of the C cam-layer channels.
    """
    if not isinstance(getattr(model, "cam_layer", None), nn.Module):
        return None
    with torch.inference_mode():
        logits, features = _WithFeatures(model).eval()(batch)
    if features.ndim != 4:
        return None
    channels = features.shape[1]
    heads = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.in_features == channels and m.out_features == 1
    ]
    if not heads:
        return None
    head = heads[-1]
    weight = head.weight.detach().reshape(-1)
    bias = float(head.bias.detach()) if head.bias is not None else 0.0
    rebuilt = features.mean(dim=(2, 3)) @ weight + bias
    if not torch.allclose(rebuilt, logits, atol=_HEAD_TOLERANCE, rtol=_HEAD_TOLERANCE):
        return None
    return CamHead(weight.numpy().astype(np.float32), bias)


def export_onnx(model: nn.Module, info: ModelInfo, out: str | Path) -> CamHead | None:
    """Write `model` as ONNX fp32 to `out` with its info; returns the CAM head it found."""
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    batch = sample_batch(info)
    try:
        cam_head = find_cam_head(model, batch)
        module = _WithFeatures(model).eval() if cam_head else model
        outputs = [LOGIT, FEATURES] if cam_head else [LOGIT]
        log = io.StringIO()
        # The exporter narrates every step (and warns that torchvision's ops are absent);
        # keep that for the error message instead of the user's terminal.
        logger = logging.getLogger("torch.onnx")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                program = torch.onnx.export(
                    module,
                    (batch,),
                    input_names=[INPUT],
                    output_names=outputs,
                    opset_version=OPSET,
                    dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                )
        except Exception as exc:
            raise ModelError(
                f"ONNX export of {info.name} failed: {exc}\n{log.getvalue()[-2000:]}"
            ) from exc
        finally:
            logger.setLevel(level)
    finally:
        model.train(was_training)
    proto = program.model_proto
    set_metadata(proto, info, cam_head)
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return cam_head


def max_logit_difference(model: nn.Module, onnx_path: str | Path, batch: np.ndarray) -> float:
    """Largest |ONNX Runtime logit - PyTorch logit| over `batch` (N, 1, S, S); any output shape
    (a logit per image, or per pixel for a segmenter)."""
    from covid_cxr.inference.runtime import OnnxRuntime

    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(batch)).numpy()
    actual = OnnxRuntime(Path(onnx_path), threads=None).logits(batch)
    return float(np.max(np.abs(actual.reshape(-1) - expected.reshape(-1))))
