"""Synthetic image files for tests: DICOM built from pixels, damaged files, oversized headers.

Tests make these in memory (or write them to tmp_path) from real radiographs, so the real data
never needs copying and every odd case is reproducible.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """The bytes of `image` saved as `fmt` (Pillow's save options pass through)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    """The first `fraction` of a file, as left by an interrupted download or upload."""
    return data[: int(len(data) * fraction)]


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed 8-bit grayscale PNG header claiming width x height, with one row of data.

    Decoding it would allocate width * height bytes; a reader must refuse it from the header.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    first_row = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", first_row)
        + chunk(b"IEND", b"")
    )


def make_dicom(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    *,
    bits_stored: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
    **attributes: Any,
) -> bytes:
    """A DICOM DX file holding `pixels` (None: no pixel data), as bytes.

    `pixels` is (rows, columns) or (frames, rows, columns) of uint8/uint16, or (rows, columns, 3)
    uint8 for RGB. Extra keyword arguments set DICOM attributes by keyword after the pixel data
    (RescaleSlope=2, WindowCenter=..., Rows=50000, ...). A compressed `transfer_syntax` is
    encoded with pydicom's own encoders. `preamble=False` writes a bare implicit-VR dataset
    without the 128-byte preamble, 'DICM' and file meta, as old archives do.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "SYNTHETIC"
    if pixels is not None:
        depth = bits_stored or pixels.dtype.itemsize * 8
        ds.set_pixel_data(pixels, photometric, depth)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.file_meta = FileMetaDataset()
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()
