"""Turn any radiograph file (PNG, JPEG, DICOM; path or bytes) into a canonical grayscale array.

CONTRACT (implemented by the imaging work; other modules rely on exactly this):

    read_radiograph(source, *, name=None, max_pixels=MAX_PIXELS, min_side=MIN_SIDE) -> Radiograph

`source` is a path (str or Path) or raw bytes; `name` labels bytes in error messages.
Raises a subclass of covid_cxr.errors.RadiographError on every bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_PIXELS = 60_000_000
MIN_SIDE = 64


@dataclass(frozen=True)
class Radiograph:
    """A decoded radiograph: float32 pixels in [0, 1], 0 = black (air), 1 = white (bone)."""

    pixels: np.ndarray
    width: int
    height: int
    format: str  # "PNG", "JPEG", "DICOM", ...
    bit_depth: int  # bits per sample as stored (8, 12, 16)
    photometric: str  # "MONOCHROME2", "MONOCHROME1", "RGB", "CMYK", "PALETTE", ...
    source: str  # the path, or the name given for bytes


def read_radiograph(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> Radiograph:
    raise NotImplementedError
