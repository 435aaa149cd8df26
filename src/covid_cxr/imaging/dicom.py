"""The DICOM half of `read_radiograph`: a hostile file costs a bounded amount of time and memory.

Every check that can be made from the header runs before a pixel is decoded:
- a deflated dataset is inflated with a cap derived from the pixel limit (a 1 MB file can
  inflate to gigabytes);
- the element headers are walked (dicom_scan) before pydicom parses them, refusing the first
  element no real file holds (group 0000, which is what a run of zeros parses as);
- Rows x Columns against the pixel limit, and Rows x Columns x SamplesPerPixel x
  BitsAllocated / 8 against the length of the uncompressed pixel data.
The modality LUT (rescale or LUT sequence) and the VOI LUT (window or LUT sequence) are applied
here in float32, and every broken value becomes a CorruptImageError or UnsupportedImageError
that says which attribute is wrong, never a traceback. Messages name attributes, never their
values, except for numbers and DICOM's own enumerated terms: a header value can be patient data.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import Any

import numpy as np
from pydicom import config as dicom_config

from covid_cxr.errors import (
    CorruptImageError,
    ImageTooLargeError,
    NotAnImageError,
    UnsupportedImageError,
)
from covid_cxr.imaging.dicom_scan import NotAHeader, looks_explicit, scan
from covid_cxr.imaging.read import (
    _EXPORT_AGAIN,
    _LUMA,
    _SAVE_AS,
    HEADER_BYTES,
    Radiograph,
    _check_size,
    _not_an_image,
)

# pydicom warns about invalid header values by quoting them (to stderr and its logger), and a
# header value can be patient data: this reader checks the values it uses itself.
dicom_config.settings.reading_validation_mode = dicom_config.IGNORE

DEFLATED = "1.2.840.10008.1.2.1.99"
_FIX_DISPLAY = "export the image without the broken window / LUT (or with the default display)"
_ACCEPTED = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
# DICOM's other defined terms (PS3.3 C.7.6.3.1.2): safe to name, they are not free text.
_KNOWN = _ACCEPTED | {"PALETTE COLOR", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK"}
_VOI_FUNCTIONS = {"LINEAR", "LINEAR_EXACT", "SIGMOID"}


def read_dicom(
    data: bytes, label: str, max_pixels: int, min_side: int, *, preamble: bool
) -> Radiograph:
    """Decode a DICOM file; without the 'DICM' preamble only if pydicom finds pixel data."""
    data = _plain(data, label, max_pixels, preamble)
    ds = _parse(data, label, preamble)
    rows, columns, photometric, bit_depth = _image_attributes(ds, label)
    _check_size(label, columns, rows, max_pixels, min_side)
    if photometric not in _ACCEPTED:
        what = photometric if photometric in _KNOWN else "an unrecognised value"
        raise UnsupportedImageError(
            label, f"DICOM photometric interpretation ({what}) is not supported", _SAVE_AS
        )
    _set_transfer_syntax(ds)
    _check_decoder(ds, label)
    _check_pixel_length(ds, label, rows, columns)
    pixels = _gray(_decode(ds, label), ds, label)
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


# --- header ---------------------------------------------------------------------------------


def _plain(data: bytes, label: str, max_pixels: int, preamble: bool) -> bytes:
    """The file with its dataset inflated (when deflated), refused when its element headers
    hold what no DICOM file does (dicom_scan: a run of zeros costs pydicom ~0.5 s a MB)."""
    from pydicom.filereader import _read_file_meta_info
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    stream = io.BytesIO(data)
    stream.seek(132 if preamble else 0)
    try:
        meta = _read_file_meta_info(stream)
    except Exception as exc:
        if not preamble:
            raise _not_an_image(label) from None
        raise CorruptImageError(label, "damaged DICOM file meta header", _EXPORT_AGAIN) from exc
    start = stream.tell()
    syntax = meta.get("TransferSyntaxUID")
    if syntax == DEFLATED:
        data, start = _inflate(data, meta, start, label, max_pixels)
    if syntax != ExplicitVRBigEndian:
        implicit = syntax == ImplicitVRLittleEndian or (
            syntax is None and not looks_explicit(data, start)
        )
        try:
            scan(data, start, implicit=implicit)
        except NotAHeader as exc:
            if not preamble:
                raise _not_an_image(label) from None
            reason = f"the DICOM header holds {exc}, which no DICOM file contains"
            raise CorruptImageError(label, reason, _EXPORT_AGAIN) from None
    return data


def _inflate(data: bytes, meta: Any, start: int, label: str, max_pixels: int) -> tuple[bytes, int]:
    """(the same file in Explicit VR Little Endian, where its dataset starts), inflating chunk by
    chunk at most what a 16-bit image within the pixel limit needs (plus HEADER_BYTES)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    cap = 2 * max_pixels + HEADER_BYTES
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending: bytes | memoryview = memoryview(data)[start:]
    chunks, size = [], 0
    while True:
        try:
            piece = inflater.decompress(pending, 2**20)
        except zlib.error as exc:
            reason = "the deflated DICOM data is damaged"
            raise CorruptImageError(label, reason, _EXPORT_AGAIN) from exc
        if not piece:
            break
        size += len(piece)
        if size > cap:
            raise ImageTooLargeError(
                label,
                f"the deflated DICOM dataset inflates to more than {cap / 2**20:,.0f} MiB, more "
                "than any image within the pixel limit needs",
                "export it uncompressed or as JPEG / JPEG 2000 / RLE Lossless",
            )
        chunks.append(piece)
        pending = inflater.unconsumed_tail
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(data[:132])
    write_file_meta_info(head, meta, enforce_standard=False)
    header = head.getvalue()
    return b"".join([header, *chunks]), len(header)


def _parse(data: bytes, label: str, preamble: bool) -> Any:
    import pydicom

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
    return ds


def _image_attributes(ds: Any, label: str) -> tuple[int, int, str, int]:
    """(rows, columns, photometric, bit depth); one frame, 1 or 3 samples, 8 or 16 bits."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        samples = int(ds.get("SamplesPerPixel") or 1)
        allocated = int(ds.BitsAllocated)
        bit_depth = int(ds.get("BitsStored") or allocated)
    except Exception:
        raise CorruptImageError(
            label,
            "DICOM image attributes (Rows, Columns, Bits Allocated, Photometric "
            "Interpretation, ...) missing or not numbers",
            _EXPORT_AGAIN,
        ) from None
    if frames > 1:
        raise UnsupportedImageError(
            label,
            f"multi-frame DICOM ({frames} frames: a cine loop, tomosynthesis or 3-D volume)",
            "export the single radiograph frame as its own DICOM or PNG",
        )
    if samples not in (1, 3) or allocated not in (1, 8, 16, 32) or not 0 < bit_depth <= allocated:
        raise CorruptImageError(
            label,
            f"impossible DICOM pixel layout ({samples} samples per pixel, {bit_depth} of "
            f"{allocated} bits)",
            _EXPORT_AGAIN,
        )
    return rows, columns, photometric, bit_depth


def _set_transfer_syntax(ds: Any) -> None:
    """A bare dataset (no file meta): pydicom guessed its encoding while parsing, and the pixel
    decoders need that guess written down as a transfer syntax."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:
        return
    guessed = {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }
    ds.file_meta.TransferSyntaxUID = guessed.get(ds.original_encoding, ImplicitVRLittleEndian)


def _check_decoder(ds: Any, label: str) -> None:
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError):
        decoder = None
    if decoder is None or not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) if decoder else "no decoder exists"
        # A registered syntax by its name; anything else is a header value, not echoed.
        name = syntax.name if syntax.name != str(syntax) else "(unregistered)"
        raise UnsupportedImageError(
            label,
            f"DICOM transfer syntax {name} cannot be decoded here ({missing})",
            "export it uncompressed or as JPEG / JPEG 2000 / RLE Lossless",
        )


def _check_pixel_length(ds: Any, label: str, rows: int, columns: int) -> None:
    """Uncompressed pixel data must hold what the header declares, before numpy allocates it."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    samples = int(ds.get("SamplesPerPixel") or 1)
    if str(ds.PhotometricInterpretation).strip().upper() == "YBR_FULL_422":
        samples = 2  # chroma subsampled: two values a pixel on average
    bits = rows * columns * samples * int(ds.BitsAllocated)
    needed = math.ceil(bits / 8)
    held = len(ds.PixelData)
    if held < needed:
        raise CorruptImageError(
            label,
            f"the DICOM pixel data holds {held:,} bytes but its header declares {rows} x "
            f"{columns} pixels, which need {needed:,}",
            _EXPORT_AGAIN,
        )


# --- pixels ---------------------------------------------------------------------------------


def _decode(ds: Any, label: str) -> np.ndarray:
    try:
        values = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptImageError(
            label, f"DICOM pixel data cannot be decoded ({exc})", _EXPORT_AGAIN
        ) from exc
    if values.ndim == 2 or (values.ndim == 3 and values.shape[-1] == 3):
        return values
    raise UnsupportedImageError(
        label, f"DICOM pixel data of shape {values.shape} is not one 2-D image", _SAVE_AS
    )


def _gray(values: np.ndarray, ds: Any, label: str) -> np.ndarray:
    """float32 luminance: colour through ITU-R 601 weights, grayscale through both LUTs."""
    if values.ndim == 3:
        pixels = values[..., 0] * _LUMA[0]
        pixels += values[..., 1] * _LUMA[1]
        pixels += values[..., 2] * _LUMA[2]
        return pixels
    return _voi(_modality(values, ds, label), ds, label)


def _number(ds: Any, keyword: str, default: float, label: str) -> float:
    """The first value of a numeric attribute; a value that is no finite number is refused."""
    from pydicom.multival import MultiValue

    raw = ds.get(keyword)
    if isinstance(raw, MultiValue | list | tuple):
        raw = raw[0] if len(raw) else None
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        reason = f"the DICOM {_spaced(keyword)} is not a number"
        raise CorruptImageError(label, reason, _FIX_DISPLAY)
    return value


def _spaced(keyword: str) -> str:
    """'WindowCenter' -> 'Window Center', the attribute's name as DICOM prints it."""
    return "".join(f" {c}" if c.isupper() else c for c in keyword).strip()


def _modality(values: np.ndarray, ds: Any, label: str) -> np.ndarray:
    """Stored values -> modality values (PS3.3 C.11.1): LUT sequence, else slope/intercept."""
    if "ModalityLUTSequence" in ds:
        return _lut(values, ds, "ModalityLUTSequence", label)
    slope = _number(ds, "RescaleSlope", 1.0, label)
    intercept = _number(ds, "RescaleIntercept", 0.0, label)
    if slope == 0:
        raise CorruptImageError(label, "the DICOM Rescale Slope is 0", _FIX_DISPLAY)
    pixels = values.astype(np.float32)
    if slope != 1:
        pixels *= np.float32(slope)
    if intercept != 0:
        pixels += np.float32(intercept)
    return pixels


def _voi(pixels: np.ndarray, ds: Any, label: str) -> np.ndarray:
    """Modality values -> display values (PS3.3 C.11.2): LUT sequence, else the first window."""
    if "VOILUTSequence" in ds:
        return _lut(pixels, ds, "VOILUTSequence", label)
    centre = _number(ds, "WindowCenter", math.nan, label)
    width = _number(ds, "WindowWidth", math.nan, label)
    if math.isnan(centre) or math.isnan(width):  # no window, or half of one: nothing to apply
        return pixels
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        raise UnsupportedImageError(
            label,
            "unknown DICOM VOI LUT Function (not LINEAR, LINEAR_EXACT or SIGMOID)",
            _FIX_DISPLAY,
        )
    linear = function == "LINEAR"
    if not (width >= 1 if linear else width > 0):
        raise CorruptImageError(
            label,
            f"the DICOM Window Width is {width:g}; a {function} window needs "
            + ("at least 1" if linear else "more than 0"),
            _FIX_DISPLAY,
        )
    return _window(pixels, centre, width, function)


def _window(pixels: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The window in place, output in [0, 1] (the min-max scaling after it fixes the range)."""
    if function == "SIGMOID":
        pixels -= np.float32(centre)
        pixels *= np.float32(-4 / width)
        np.exp(pixels, out=pixels)
        pixels += 1
        return np.reciprocal(pixels, out=pixels)
    if function == "LINEAR" and width == 1:
        return (pixels > centre - 0.5).astype(np.float32)
    offset, scale = (centre - 0.5, width - 1) if function == "LINEAR" else (centre, width)
    pixels -= np.float32(offset)
    pixels /= np.float32(scale)
    pixels += np.float32(0.5)
    return np.clip(pixels, 0, 1, out=pixels)


def _lut(values: np.ndarray, ds: Any, keyword: str, label: str) -> np.ndarray:
    """A LUT sequence's first table applied to `values` (PS3.3 C.11.1.1 / C.8.11.3.1.5)."""
    name = _spaced(keyword).replace("L U T", "LUT").replace("V O I", "VOI")
    table, first = _table(ds, keyword, name, label)
    index = (
        np.rint(values).astype(np.int32) if values.dtype.kind == "f" else values.astype(np.int32)
    )
    index -= first
    np.clip(index, 0, len(table) - 1, out=index)
    return table[index]


def _table(ds: Any, keyword: str, name: str, label: str) -> tuple[np.ndarray, int]:
    """(float32 table, first mapped value) of a LUT sequence, every part checked."""
    broken = CorruptImageError(label, f"the DICOM {name} is empty or damaged", _FIX_DISPLAY)
    try:
        item = ds[keyword].value[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        raw = item["LUTData"].value
    except Exception:
        raise broken from None
    entries = entries or 65536
    if not (bits == 8 or 10 <= bits <= 16):
        raise CorruptImageError(
            label,
            f"the DICOM {name} declares {bits} bits per entry (8 to 16 allowed)",
            _FIX_DISPLAY,
        )
    if isinstance(raw, bytes | bytearray):
        order = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
        table = np.frombuffer(raw, f"{order}u2", count=len(raw) // 2)
    else:
        table = np.asarray(raw if isinstance(raw, list | tuple) else [raw], dtype=np.float64)
    if table.size < entries:
        raise broken
    return table[:entries].astype(np.float32), first
