"""Turn any radiograph file (PNG, JPEG, TIFF, DICOM; path or bytes) into one grayscale array.

CONTRACT (other modules rely on exactly this):

    read_radiograph(source, *, name=None, max_pixels=MAX_PIXELS, min_side=MIN_SIDE,
                    max_bytes=None) -> Radiograph

`source` is a path (str or Path) or raw bytes; `name` labels bytes in error messages.
`max_bytes` (None: 3 bytes per allowed pixel plus 16 MiB, the most an uncompressed image within
`max_pixels` can take) is checked with stat() before a byte of a path is read.
Raises a subclass of covid_cxr.errors.RadiographError on every bad input.

Decisions, so that every caller gets the same pixels for the same file:
- The format is found from the content, never from the file name.
- Accepted: PNG, JPEG (MPO camera JPEGs: the primary image), single-page TIFF, single-frame
  DICOM. Refused as UnsupportedImageError: every other format Pillow knows (GIF, BMP, WebP, ...),
  multi-frame files, floating-point and signed pixel modes, DICOM PALETTE COLOR.
- Colour becomes luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B). Transparency is composited
  on black: transparent means "nothing there", and in a radiograph nothing is air, which is black.
- PNG/JPEG/TIFF keep their absolute scale (value / 255 or / 65535); 16-bit data is never
  squashed to 8 bits first. DICOM has no fixed display scale, so after the modality LUT
  (rescale slope/intercept) and the VOI LUT (or window centre/width) it is min-max scaled,
  then MONOCHROME1 is inverted so that 1 is always white (bone).
- The pixel-count guard runs on the header (Pillow's lazy open, DICOM Rows x Columns) before a
  single pixel is decoded; decoding holds the stored integers plus one float32 copy, no more.
- Only regular files are opened: a named pipe would block the reader forever.
- DICOM lives in imaging/dicom.py (imported, with pydicom, only when a file is DICOM).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from covid_cxr.errors import (
    CorruptImageError,
    EmptyFileError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    UnreadableFileError,
    UnsupportedImageError,
)

MAX_PIXELS = 60_000_000
MIN_SIDE = 64
HEADER_BYTES = 16 * 2**20  # what a file may hold beside its pixels (DICOM headers, overlays)

_FORMATS = {"PNG", "JPEG", "MPO", "TIFF"}
_SAVE_AS = "save the radiograph as PNG, JPEG or DICOM"
_EXPORT_AGAIN = "export or download the file again"
# Signatures of the accepted Pillow formats: bytes that start like one of these but that Pillow
# cannot identify are a damaged file, not "not an image".
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_GRAY8 = {"L": 8, "1": 1}
_GRAY16 = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_COLOUR = {"RGB", "RGBX", "CMYK", "YCbCr", "P"}
_ALPHA = {"LA", "RGBA", "PA"}
_MODES = _GRAY8.keys() | _GRAY16 | _COLOUR | _ALPHA
_PHOTOMETRIC = {"L": "MONOCHROME2", "1": "MONOCHROME2", "P": "PALETTE", "PA": "PALETTE"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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
    # DICOM inputs: the header as pydicom read it, pixel data removed (UIDs, patient and study
    # attributes for DICOM results, Modality and ViewPosition for the input gate). Never log it.
    dataset: Any = field(default=None, repr=False, compare=False)


def read_radiograph(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
    max_bytes: int | None = None,
) -> Radiograph:
    """Decode one radiograph, refusing bad input with an error that says which file and why."""
    limit = max_limit_bytes(max_pixels) if max_bytes is None else max_bytes
    label, data = _read_bytes(source, name, limit)
    if not data:
        raise EmptyFileError(label, "the file is empty (0 bytes)", _EXPORT_AGAIN)
    if len(data) > limit:
        raise _too_many_bytes(label, len(data), limit)
    if sniff_format(data) == "DICOM":
        from covid_cxr.imaging.dicom import read_dicom

        return read_dicom(data, label, max_pixels, min_side, preamble=True)
    return _read_pillow(data, label, max_pixels, min_side)


def max_limit_bytes(max_pixels: int) -> int:
    """The largest file an image within `max_pixels` needs: uncompressed RGB or 16-bit
    grayscale (up to 3 bytes a pixel) plus a header."""
    return 3 * max_pixels + HEADER_BYTES


def _too_many_bytes(label: str, size: int, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        label,
        f"the file is {size / 2**20:,.1f} MiB, more than the limit of {limit / 2**20:,.1f} MiB",
        "check that this is a radiograph; save it as PNG or JPEG, which are much smaller",
    )


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG, TIFF or DICOM (with its 128-byte preamble) from the magic bytes alone.

    File names and declared content types are claims, not facts; None for anything else.
    """
    if data[128:132] == b"DICM":
        return "DICOM"
    return next((kind for sig, kind in _SIGNATURES.items() if data.startswith(sig)), None)


def _read_bytes(source: str | Path | bytes, name: str | None, limit: int) -> tuple[str, bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        return name or "<bytes>", bytes(source)
    path = Path(source)
    label = name or str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a named pipe, device or socket"
            raise UnreadableFileError(label, f"not a regular file ({kind})", "name an image file")
        if info.st_size > limit:
            raise _too_many_bytes(label, info.st_size, limit)
        # O_NONBLOCK: should the path become a named pipe after the stat, open() must not wait.
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(handle, "rb") as stream:
            return label, stream.read(limit + 1)
    except OSError as exc:
        reason = f"cannot read the file ({exc.strerror or exc})"
        raise UnreadableFileError(label, reason, "check the path and its permissions") from exc


def _check_size(label: str, width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            label,
            f"{width} x {height} pixels is more than the limit of {max_pixels:,} pixels",
            "downscale it; a chest radiograph needs at most about 4,000 px on a side",
        )
    if min(width, height) < min_side:
        raise ImageTooSmallError(
            label,
            f"{width} x {height} pixels is smaller than {min_side} px on a side",
            "use the full-size radiograph, not a thumbnail",
        )


def _read_pillow(data: bytes, label: str, max_pixels: int, min_side: int) -> Radiograph:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(label, f"the header claims too many pixels ({exc})") from exc
    except UnidentifiedImageError:
        kind = sniff_format(data)
        if kind is not None:
            raise CorruptImageError(
                label, f"starts like a {kind} file but its header is damaged", _EXPORT_AGAIN
            ) from None
        from covid_cxr.imaging.dicom import read_dicom

        return read_dicom(data, label, max_pixels, min_side, preamble=False)
    except Exception as exc:
        raise CorruptImageError(label, f"damaged image header ({exc})", _EXPORT_AGAIN) from exc
    with image:
        fmt = image.format or "unknown"
        if fmt not in _FORMATS:
            raise UnsupportedImageError(label, f"{fmt} images are not accepted", _SAVE_AS)
        try:
            frames = getattr(image, "n_frames", 1)
        except Exception as exc:
            raise CorruptImageError(label, f"damaged {fmt} file ({exc})", _EXPORT_AGAIN) from exc
        if frames > 1 and fmt != "MPO":
            raise UnsupportedImageError(
                label,
                f"{fmt} file with {frames} frames; one radiograph per file is expected",
                "save the one radiograph as its own PNG",
            )
        _check_size(label, image.width, image.height, max_pixels, min_side)
        mode = image.mode
        if mode not in _MODES:
            reason = f"{fmt} pixel mode {mode!r} (floating-point, signed or exotic) is refused"
            raise UnsupportedImageError(label, reason, _SAVE_AS)
        try:
            image.load()
        except MemoryError:
            raise
        except Exception as exc:
            raise CorruptImageError(
                label, f"the {fmt} data is truncated or damaged ({exc})", _EXPORT_AGAIN
            ) from exc
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        values, scale, bit_depth = _pillow_values(image, label)
    # Pillow's copy is freed (closed) before the one float32 copy is made.
    pixels = np.multiply(values, np.float32(scale), dtype=np.float32)
    del values
    return Radiograph(
        pixels=pixels,
        width=pixels.shape[1],
        height=pixels.shape[0],
        format=fmt,
        bit_depth=bit_depth,
        photometric=_PHOTOMETRIC.get(mode, "MONOCHROME2" if mode in _GRAY16 else mode),
        source=label,
    )


def _pillow_values(image: Image.Image, label: str) -> tuple[np.ndarray, float, int]:
    """(integer luminance, its full-scale factor, bit depth): the smallest exact representation,
    so a large image is held once as integers and once as float32, never as float64."""
    mode = image.mode
    if mode in _GRAY16:
        values = np.asarray(image)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImageError(
                label, "32-bit integer pixels outside the 16-bit range 0..65535", _SAVE_AS
            )
        return values, 1 / 65535, 16
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in _ALPHA:
        # Composited on black: luma x alpha, exact in 16 bits (255 x 255 = 65025).
        alpha = np.asarray(image.getchannel("A"))
        return np.multiply(np.asarray(image.convert("L")), alpha, dtype=np.uint16), 1 / 65025, 8
    bit_depth = _GRAY8.get(mode, 8)
    if mode != "L":
        image = image.convert("L")
    return np.asarray(image), 1 / 255, bit_depth


def _not_an_image(label: str) -> NotAnImageError:
    return NotAnImageError(
        label,
        "not a PNG, JPEG, TIFF or DICOM image (the content is not any image format)",
        f"check that this is the right file; {_SAVE_AS}",
    )
