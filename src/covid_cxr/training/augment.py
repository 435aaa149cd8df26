"""Random augmentation of whole batches in memory: one affine resampling plus intensity jitter.

Every geometric change (zoom, shear, rotation, shift, random crop, horizontal flip) is folded
into one affine matrix per image, and the batch is resampled once with `grid_sample`, so
augmenting costs a few milliseconds per batch instead of a Python loop per image.

Matrices map output coordinates to input coordinates (as Keras' ImageDataGenerator and
`affine_grid` both do), in normalised coordinates where the image spans [-1, 1]; for square
images that is the pixel geometry about the centre.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F

from covid_cxr.config import AugmentConfig


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _matrices(n: int, a: list[list[torch.Tensor | float]]) -> torch.Tensor:
    """Stack a 3x3 matrix given as nested lists of per-image tensors or constants into (n, 3, 3)."""
    rows = [
        torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(n) for v in r], -1) for r in a
    ]
    return torch.stack(rows, -2)


def random_affine(
    n: int, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, 2, 3) output-to-input matrices for `affine_grid`, drawn per image."""
    zero, one = 0.0, 1.0
    # Keras: independent zoom factors for the two axes, in [1 - zoom, 1 + zoom].
    zx = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator)
    zy = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator)
    zoom = _matrices(n, [[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
    # Keras' shear (degrees in Keras 2.x): x_in = cos(s) x, y_in = y - sin(s) x.
    s = torch.deg2rad(_uniform(n, -config.shear, config.shear, generator))
    shear = _matrices(n, [[s.cos(), zero, zero], [-s.sin(), one, zero], [zero, zero, one]])
    t = torch.deg2rad(_uniform(n, -config.rotation, config.rotation, generator))
    rotate = _matrices(n, [[t.cos(), -t.sin(), zero], [t.sin(), t.cos(), zero], [zero, zero, one]])
    tx = 2 * _uniform(n, -config.translate, config.translate, generator)
    ty = 2 * _uniform(n, -config.translate, config.translate, generator)
    shift = _matrices(n, [[one, zero, tx], [zero, one, ty], [zero, zero, one]])
    # Random resized crop: a square window covering an area fraction in [crop_scale, 1],
    # placed uniformly inside the image, stretched to the full output.
    side = _uniform(n, config.crop_scale, 1.0, generator).sqrt()
    cx = (1 - side) * _uniform(n, -1.0, 1.0, generator)
    cy = (1 - side) * _uniform(n, -1.0, 1.0, generator)
    crop = _matrices(n, [[side, zero, cx], [zero, side, cy], [zero, zero, one]])
    flip = torch.ones(n, dtype=torch.float64)
    if config.hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    mirror = _matrices(n, [[flip, zero, zero], [zero, one, zero], [zero, zero, one]])
    # Keras order: rotation, shift, shear, zoom; then the crop window and the mirror image.
    matrix = crop @ rotate @ shift @ shear @ zoom @ mirror
    return matrix[:, :2, :].float()


def _geometric(config: AugmentConfig) -> bool:
    return (
        bool(config.zoom or config.shear or config.rotation or config.translate)
        or config.crop_scale < 1.0
    )


@overload
def augment_batch(
    images: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
    masks: None = None,
) -> torch.Tensor: ...


@overload
def augment_batch(
    images: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None,
    masks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def augment_batch(
    images: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
    masks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Augment a float (N, C, H, W) batch in [0, 1]; returns a new float32 batch in [0, 1].

    With `masks` (N, K, H, W), 0/1 (e.g. lung masks for segmentation), returns (images, masks):
    each mask gets exactly its image's geometric transform (resampled bilinearly, then
    re-binarised at 0.5) and no intensity change. The random draws are the same with or
    without masks, so the images come out the same either way.
    """
    x = images.float()
    m = None if masks is None else masks.float()
    n = x.shape[0]
    if _geometric(config):
        theta = random_affine(n, config, generator)
        x = _resample(x, theta, config.fill)
        m = None if m is None else _resample(m, theta, config.fill).ge_(0.5).float()
    elif config.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        m = None if m is None else torch.where(flip, m.flip(-1), m)
    x = _jitter(x, config, generator).clamp_(0.0, 1.0)
    return x if m is None else (x, m)


def _resample(x: torch.Tensor, theta: torch.Tensor, fill: str) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)


def _jitter(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Contrast, brightness and gamma, drawn per image (intensity only: never for masks)."""
    n = x.shape[0]
    if config.contrast:
        c = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator).float()
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * c.view(n, 1, 1, 1) + mean
    if config.brightness:
        b = _uniform(n, -config.brightness, config.brightness, generator).float()
        x = x + b.view(n, 1, 1, 1)
    if config.gamma:
        g = _uniform(n, -config.gamma, config.gamma, generator).exp().float()
        x = x.clamp(0, 1) ** g.view(n, 1, 1, 1)
    return x


def describe(config: AugmentConfig) -> str:
    """One line for logs, e.g. 'hflip, zoom 0.2, shear 0.2 deg'."""
    parts = ["hflip"] if config.hflip else []
    for key, unit in (("zoom", ""), ("shear", " deg"), ("rotation", " deg"), ("translate", "")):
        if getattr(config, key):
            parts.append(f"{key} {getattr(config, key):g}{unit}")
    if config.crop_scale < 1:
        parts.append(f"crop area >= {config.crop_scale:g}")
    for key in ("brightness", "contrast", "gamma"):
        if getattr(config, key):
            parts.append(f"{key} {getattr(config, key):g}")
    return ", ".join(parts) or "none"
