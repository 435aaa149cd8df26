"""The Secondary Capture: the Grad-CAM overlay with a burned-in research-use banner."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from covid_cxr import RESEARCH_NOTICE

BANNER_BACKGROUND = (0, 0, 0)
BANNER_TEXT = (255, 255, 0)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def with_banner(overlay_rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """`overlay_rgb` (H, W, 3) uint8 below a black band holding the research-use notice and
    `lines`. The band is added above the image, not drawn over it, so no anatomy is hidden."""
    if overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3 or overlay_rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {overlay_rgb.shape}")
    height, width = overlay_rgb.shape[:2]
    texts = [RESEARCH_NOTICE, *lines]
    size = max(10, width // 32)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # Shrink the font until the longest line fits the image width.
    while size > 8 and max(probe.textlength(t, font=font) for t in texts) > width - size:
        size -= 1
        font = _font(size)
    line_height = int(size * 1.3)
    band = line_height * len(texts) + size // 2
    canvas = Image.new("RGB", (width, height + band), BANNER_BACKGROUND)
    canvas.paste(Image.fromarray(overlay_rgb), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(texts):
        draw.text((size // 2, size // 4 + i * line_height), text, fill=BANNER_TEXT, font=font)
    return np.asarray(canvas)
