"""Turn any radiograph file (PNG, JPEG, TIFF, DICOM; path or bytes) into one grayscale array.

CONTRACT (other modules rely on exactly this):

    read_radiograph(source, *, name=None, max_pixels=MAX_PIXELS, min_side=MIN_SIDE) -> Radiograph

`source` is a path (str or Path) or raw bytes; `name` labels bytes in error messages.
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
  single pixel is decoded.
"""

from __future__ import annotations

import io
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
_DICOM_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
}
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
) -> Radiograph:
    """Decode one radiograph, refusing bad input with an error that says which file and why."""
    label, data = _read_bytes(source, name)
    if not data:
        raise EmptyFileError(label, "the file is empty (0 bytes)", _EXPORT_AGAIN)
    if sniff_format(data) == "DICOM":
        return _read_dicom(data, label, max_pixels, min_side, preamble=True)
    return _read_pillow(data, label, max_pixels, min_side)


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG, TIFF or DICOM (with its 128-byte preamble) from the magic bytes alone.

    File names and declared content types are claims, not facts; None for anything else.
    """
    if data[128:132] == b"DICM":
        return "DICOM"
    return next((kind for sig, kind in _SIGNATURES.items() if data.startswith(sig)), None)


def _read_bytes(source: str | Path | bytes, name: str | None) -> tuple[str, bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        return name or "<bytes>", bytes(source)
    path = Path(source)
    label = name or str(path)
    try:
        return label, path.read_bytes()
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
        return _read_dicom(data, label, max_pixels, min_side, preamble=False)
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
        pixels, bit_depth = _pillow_gray(image, label)
    return Radiograph(
        pixels=pixels,
        width=pixels.shape[1],
        height=pixels.shape[0],
        format=fmt,
        bit_depth=bit_depth,
        photometric=_PHOTOMETRIC.get(mode, "MONOCHROME2" if mode in _GRAY16 else mode),
        source=label,
    )


def _pillow_gray(image: Image.Image, label: str) -> tuple[np.ndarray, int]:
    """Luminance in [0, 1] with one pass over the pixels for the common 8-bit case."""
    mode = image.mode
    if mode in _GRAY16:
        values = np.asarray(image)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImageError(
                label, "32-bit integer pixels outside the 16-bit range 0..65535", _SAVE_AS
            )
        return np.multiply(values, np.float32(1 / 65535), dtype=np.float32), 16
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in _ALPHA:
        alpha = np.asarray(image.getchannel("A"))
        luma = np.multiply(np.asarray(image.convert("L")), alpha, dtype=np.float32)
        return np.multiply(luma, np.float32(1 / 65025), out=luma), 8
    bit_depth = _GRAY8.get(mode, 8)
    if mode != "L":
        image = image.convert("L")
    return np.multiply(np.asarray(image), np.float32(1 / 255), dtype=np.float32), bit_depth


def _not_an_image(label: str) -> NotAnImageError:
    return NotAnImageError(
        label,
        "not a PNG, JPEG, TIFF or DICOM image (the content is not any image format)",
        f"check that this is the right file; {_SAVE_AS}",
    )


def _read_dicom(
    data: bytes, label: str, max_pixels: int, min_side: int, *, preamble: bool
) -> Radiograph:
    """Decode a DICOM file; without the 'DICM' preamble only if pydicom finds pixel data."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not preamble)
        has_pixels = "PixelData" in ds
    except Exception as exc:
        if not preamble:
            raise _not_an_image(label) from None
        raise CorruptImageError(label, f"damaged DICOM file ({exc})", _EXPORT_AGAIN) from exc
    if not has_pixels:
        if not preamble:
            raise _not_an_image(label)
        raise NotAnImageError(
            label,
            "DICOM file without pixel data (a report, DICOMDIR or other non-image object)",
            "export the radiograph image itself",
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        bit_depth = int(ds.get("BitsStored") or ds.BitsAllocated)
    except Exception as exc:
        raise CorruptImageError(
            label, f"DICOM image attributes missing or invalid ({exc})", _EXPORT_AGAIN
        ) from exc
    if frames > 1:
        raise UnsupportedImageError(
            label,
            f"multi-frame DICOM ({frames} frames: a cine loop, tomosynthesis or 3-D volume)",
            "export the single radiograph frame as its own DICOM or PNG",
        )
    _check_size(label, columns, rows, max_pixels, min_side)
    if photometric not in _DICOM_PHOTOMETRIC:
        raise UnsupportedImageError(
            label, f"DICOM photometric interpretation {photometric} is not supported", _SAVE_AS
        )
    if "TransferSyntaxUID" not in ds.file_meta:
        # A bare dataset (no file meta): pydicom guessed its encoding while parsing, and the
        # pixel decoders need that guess written down as a transfer syntax.
        guessed = {
            (True, True): ImplicitVRLittleEndian,
            (False, True): ExplicitVRLittleEndian,
            (False, False): ExplicitVRBigEndian,
        }
        ds.file_meta.TransferSyntaxUID = guessed.get(ds.original_encoding, ImplicitVRLittleEndian)
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError):
        decoder = None
    if decoder is None or not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) if decoder else "no decoder exists"
        raise UnsupportedImageError(
            label,
            f"DICOM transfer syntax {syntax.name or syntax} cannot be decoded here ({missing})",
            "export it uncompressed or as JPEG / JPEG 2000 / RLE Lossless",
        )
    try:
        values = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptImageError(
            label, f"DICOM pixel data cannot be decoded ({exc})", _EXPORT_AGAIN
        ) from exc
    if values.ndim == 3 and values.shape[-1] == 3:
        pixels = values @ _LUMA
    elif values.ndim == 2:
        pixels = apply_voi_lut(apply_modality_lut(values, ds), ds).astype(np.float32, copy=False)
    else:
        raise UnsupportedImageError(
            label, f"DICOM pixel data of shape {values.shape} is not one 2-D image", _SAVE_AS
        )
    low, high = pixels.min(), pixels.max()
    pixels -= low
    if high > low:
        pixels /= high - low
    if photometric == "MONOCHROME1":
        np.subtract(1, pixels, out=pixels)
    del ds.PixelData  # keep the header only; the pixels live on as `pixels`
    return Radiograph(
        pixels=pixels,
        width=columns,
        height=rows,
        format="DICOM",
        bit_depth=bit_depth,
        photometric=photometric,
        source=label,
        dataset=ds,
    )
