"""Grad-CAM: where in the radiograph the evidence for "COVID-19" lies.

`grad_cam` explains any PyTorch model of the factory through its `cam_layer`;
`cam_from_features` rebuilds the same map from exported features and the linear head weights
(for a global-average-pool -> linear head Grad-CAM equals CAM), which is how ONNX models are
explained; `overlay` puts a map back onto the original radiograph. The overlay path is pure
numpy + PIL because the web service calls it for every request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from covid_cxr.imaging.preprocess import Box, crop_box, grey_to_uint8

if TYPE_CHECKING:
    import torch
    from torch import nn

# Relative to the map's own magnitude: activations of an untrained network can be ~1e-8.
_FLAT = 1e-6


def _normalise(maps: np.ndarray) -> np.ndarray:
    """ReLU then per-image min-max to [0, 1]; a flat map carries no localisation, so it is 0."""
    scale = np.abs(maps).max(axis=(1, 2), keepdims=True).astype(np.float32)
    maps = np.maximum(maps.astype(np.float32, copy=False), 0.0)
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    flat = span <= _FLAT * scale
    out = (maps - lo) / np.where(flat, 1.0, span)
    return np.where(flat, 0.0, out).astype(np.float32)


def grad_cam(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (N,) and Grad-CAM maps (N, h, w) in [0, 1] at `model.cam_layer`'s resolution.

    Runs in eval mode (batch-norm statistics must not depend on the batch being explained)
    and restores the caller's mode; gradients go to the activations only, so parameter
    `.grad`s are untouched.
    """
    import torch  # here, not at the top: the service's overlay path must not load torch

    layer = getattr(model, "cam_layer", None)
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(f"{type(model).__name__} has no `cam_layer` module to explain")
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # Gradients must reach the activations even when every parameter is frozen.
            inputs = batch.detach().clone().requires_grad_(True)
            logits = model(inputs)
            if not captured:
                raise RuntimeError("cam_layer was not called during the forward pass")
            activations = captured[-1]
            (grads,) = torch.autograd.grad(logits.sum(), activations)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    maps = (weights * activations).sum(dim=1).detach().cpu().numpy()
    return logits.detach(), _normalise(maps)


def cam_from_features(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """CAM (N, h, w) in [0, 1] from cam-layer features (N, C, h, w) and head weights (C,).

    For logit = w . mean_hw(A) + b the gradient is w / (h*w) everywhere, so Grad-CAM's
    weights are w up to a positive factor that the normalisation removes.
    """
    features = np.asarray(features, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    if features.ndim != 4 or features.shape[1] != weights.shape[0]:
        raise ValueError(
            f"features (N, C, h, w) and weights (C,) do not match: "
            f"{features.shape} vs {weights.shape}"
        )
    return _normalise(np.einsum("nchw,c->nhw", features, weights))


def _jet_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    channels = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return (np.stack(channels, axis=1) * 255.0 + 0.5).astype(np.uint8)


JET = _jet_lut()


def overlay(
    pixels: np.ndarray,
    cam: np.ndarray,
    alpha: float = 0.4,
    crop: float = 1.0,
    *,
    box: Box | None = None,
) -> np.ndarray:
    """The radiograph (H, W) in [0, 1] as RGB uint8 with `cam` blended in as a jet heat map.

    The map covers the region the model saw: `box` (top, left, height, width), as carried by
    `Prediction.box`, or else the central `crop` fraction (the PreprocessConfig's crop) at
    the original resolution; outside it the radiograph stays grey.
    """
    if pixels.ndim != 2 or cam.ndim != 2:
        raise ValueError(f"expected 2-D pixels and cam, got {pixels.shape} and {cam.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    grey = grey_to_uint8(pixels)
    out = np.repeat(grey[:, :, None], 3, axis=2)
    top, left, ch, cw = box if box is not None else crop_box(*pixels.shape, crop)
    heat = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32)).resize(
        (cw, ch), Image.Resampling.BILINEAR
    )
    index = (np.clip(np.asarray(heat), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    region = out[top : top + ch, left : left + cw].astype(np.float32)
    blended = (1.0 - alpha) * region + alpha * JET[index].astype(np.float32)
    out[top : top + ch, left : left + cw] = (blended + 0.5).astype(np.uint8)
    return out
