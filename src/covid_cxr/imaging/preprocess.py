"""The one preprocessing function, shared by training, evaluation, export and serving.

Its settings travel with every model (checkpoint and ONNX metadata), so inference always
repeats exactly what training did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

Intensity = Literal["rescale", "equalize"]
Lungs = Literal["off", "crop", "crop-attenuate"]
Box = tuple[int, int, int, int]  # (top, left, height, width) on the radiograph


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded radiograph becomes model input.

    size: square side fed to the model.
    intensity: "rescale" keeps the stored grey levels (the original recipe's 1/255 rescale);
        "equalize" clips the 0.5/99.5 percentiles and equalises the histogram, which removes
        much of the exposure and processing differences between hospitals.
    crop: central fraction of each side kept before resizing; below 1 it trims borders where
        burnt-in text, rulers and markers sit (a known shortcut) and keeps the lungs. Applies
        only when `lungs` is "off": a lung crop replaces the central one.
    lungs: "crop" keeps the lungs' bounding box (from the shipped lung segmenter) plus
        `lung_margin`; "crop-attenuate" also multiplies what lies outside the lungs by
        `outside_lungs`; "off" (older models) does neither.
    lung_margin: fraction of the box's height/width added on each side, clipped to the image.
    outside_lungs: multiplier for the pixels outside the lung mask in "crop-attenuate".
    """

    size: int = 224
    intensity: Intensity = "rescale"
    crop: float = 1.0
    lungs: Lungs = "off"
    lung_margin: float = 0.1
    outside_lungs: float = 0.3

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 2048:
            raise ValueError(f"preprocess.size must be between 16 and 2048, got {self.size}")
        if self.intensity not in ("rescale", "equalize"):
            raise ValueError(
                f"preprocess.intensity must be 'rescale' or 'equalize', got {self.intensity!r}"
            )
        if not 0.5 <= self.crop <= 1.0:
            raise ValueError(f"preprocess.crop must be between 0.5 and 1.0, got {self.crop}")
        if self.lungs not in ("off", "crop", "crop-attenuate"):
            raise ValueError(
                f"preprocess.lungs must be 'off', 'crop' or 'crop-attenuate', got {self.lungs!r}"
            )
        if not 0.0 <= self.lung_margin <= 0.5:
            raise ValueError(
                f"preprocess.lung_margin must be between 0 and 0.5, got {self.lung_margin}"
            )
        if not 0.0 <= self.outside_lungs <= 1.0:
            raise ValueError(
                f"preprocess.outside_lungs must be between 0 and 1, got {self.outside_lungs}"
            )

    @property
    def needs_lungs(self) -> bool:
        """Whether inputs need the radiograph's lung mask (see `preprocess`)."""
        return self.lungs != "off"

    def to_dict(self) -> dict[str, Any]:
        """Plain settings for model metadata. Without a lung crop the lung fields (unused) are
        left out, so such models record exactly what models did before they existed."""
        data = asdict(self)
        if not self.needs_lungs:
            for name in ("lungs", "lung_margin", "outside_lungs"):
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(**data)


def _equalize(pixels: np.ndarray, bins: int = 65536) -> np.ndarray:
    # 16-bit bins: with fewer, a darker exposure (gamma 2 on an 8-bit JPEG) packs the dark grey
    # levels into a few bins and shifts every output by ~0.04, defeating the point.
    lo, hi = np.percentile(pixels, (0.5, 99.5))
    if hi - lo < 1e-6:
        return np.zeros_like(pixels)
    clipped = np.clip((pixels - lo) / (hi - lo), 0.0, 1.0)
    # Uniform bins: index arithmetic gives np.histogram + np.interp's result ~5x faster.
    scaled = clipped * bins
    hist = np.bincount(np.minimum(scaled.astype(np.int64), bins - 1).ravel(), minlength=bins)
    cdf = np.cumsum(hist).astype(np.float64)
    cdf = (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1.0)
    pos = scaled - 1.0  # position on the right bin edges, where the cdf values sit
    k = np.clip(np.floor(pos).astype(np.int64), 0, bins - 2)
    frac = np.clip(pos - k, 0.0, 1.0)
    return (cdf[k] * (1.0 - frac) + cdf[k + 1] * frac).astype(np.float32)


def grey_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A [0, 1] radiograph as 8-bit grey for display and PNG files (rounded, clipped)."""
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def crop_box(height: int, width: int, crop: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the central region kept for `crop`; heat maps are
    placed back on the original radiograph with the same box."""
    if crop >= 1.0:
        return 0, 0, height, width
    ch, cw = max(1, round(height * crop)), max(1, round(width * crop))
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def lung_box(mask: np.ndarray, margin: float) -> Box | None:
    """The lungs' bounding box grown by `margin` of its side on each side, clipped to the
    image; None when the mask is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    pad_h = round((rows[-1] + 1 - rows[0]) * margin)
    pad_w = round((cols[-1] + 1 - cols[0]) * margin)
    top, left = max(0, int(rows[0]) - pad_h), max(0, int(cols[0]) - pad_w)
    bottom, right = min(height, int(rows[-1]) + 1 + pad_h), min(width, int(cols[-1]) + 1 + pad_w)
    return top, left, bottom - top, right - left


def scale_box(box: Box, shape: tuple[int, int], new_shape: tuple[int, int]) -> Box:
    """`box` on a (H, W) radiograph moved onto the same radiograph resized to `new_shape`."""
    sy, sx = new_shape[0] / shape[0], new_shape[1] / shape[1]
    top, left = round(box[0] * sy), round(box[1] * sx)
    bottom = min(new_shape[0], max(top + 1, round((box[0] + box[2]) * sy)))
    right = min(new_shape[1], max(left + 1, round((box[1] + box[3]) * sx)))
    return top, left, bottom - top, right - left


def input_box(
    shape: tuple[int, int], config: PreprocessConfig, lungs: np.ndarray | None = None
) -> Box:
    """The region of a (H, W) radiograph that becomes the model input; heat maps go back there.

    The central `crop` box when `config.lungs` is "off", else the lungs' box with its margin.
    """
    if not config.needs_lungs:
        return crop_box(*shape, config.crop)
    if lungs is None:
        raise ValueError(
            f"preprocess.lungs is {config.lungs!r}: the radiograph's lung mask is needed "
            "(covid_cxr.segmentation.model_input segments it)"
        )
    if lungs.shape != tuple(shape):
        raise ValueError(f"lung mask shape {lungs.shape} differs from the image's {shape}")
    box = lung_box(lungs, config.lung_margin)
    if box is None:
        raise ValueError("the lung mask is empty: no lung fields to crop to")
    return box


def preprocess(
    pixels: np.ndarray, config: PreprocessConfig, lungs: np.ndarray | None = None
) -> np.ndarray:
    """Map a (H, W) float32 radiograph in [0, 1] to a (size, size) float32 array in [0, 1].

    `lungs`: the radiograph-sized boolean lung mask, required when `config.lungs` is not "off".
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {pixels.shape}")
    top, left, height, width = input_box(pixels.shape, config, lungs)
    image = pixels.astype(np.float32, copy=False)[top : top + height, left : left + width]
    if config.lungs == "crop-attenuate":
        assert lungs is not None  # input_box checked it
        outside = ~np.asarray(lungs, bool)[top : top + height, left : left + width]
        # In place on one copy: a large radiograph's crop is up to 64 MB of float32.
        image = image.copy()
        np.multiply(image, np.float32(config.outside_lungs), out=image, where=outside)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (config.size, config.size), Image.Resampling.BILINEAR
    )
    out = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    # Equalising after the resize costs the same whatever the stored resolution.
    return _equalize(out) if config.intensity == "equalize" else out
