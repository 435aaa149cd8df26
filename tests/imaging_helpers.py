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


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    """`data` with the one occurrence of `old` replaced by `new` of the same length: a header
    value no DICOM writer would produce (a window centre that is not a number, ...)."""
    assert len(old) == len(new) and data.count(old) == 1
    return data.replace(old, new)


def _split_after_meta(dicom: bytes) -> tuple[bytes, bytes]:
    """(preamble + 'DICM' + file meta, dataset) of an explicit-VR-little-endian DICOM file."""
    offset = 132
    while dicom[offset : offset + 2] == b"\x02\x00":  # group 0002, little endian
        vr = dicom[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            length = struct.unpack("<I", dicom[offset + 8 : offset + 12])[0]
            offset += 12 + length
        else:
            length = struct.unpack("<H", dicom[offset + 6 : offset + 8])[0]
            offset += 8 + length
    return dicom[:offset], dicom[offset:]


def with_transfer_syntax(meta: bytes, uid: str) -> bytes:
    """File meta bytes (from `_split_after_meta`) declaring another transfer syntax."""
    old = ExplicitVRLittleEndian.encode() + b"\x00"
    new = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    tag = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(old))
    assert meta.count(tag + old) == 1
    meta = meta.replace(tag + old, b"\x02\x00\x10\x00UI" + struct.pack("<H", len(new)) + new)
    # Group length (0002,0000) UL counts the bytes after it.
    group_length = len(meta) - 132 - 12
    return meta[:132] + meta[132:140] + struct.pack("<I", group_length) + meta[144:]


def deflate_bomb(pixels: np.ndarray, inflated_bytes: int = 2**30) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of `pixels` with a private element of
    `inflated_bytes` zeros before the pixel data: ~1 MB on disk per GiB once inflated."""
    meta, dataset = _split_after_meta(make_dicom(pixels))
    pixel_tag = dataset.index(b"\xe0\x7f\x10\x00")
    meta = with_transfer_syntax(meta, "1.2.840.10008.1.2.1.99")
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    creator = b"\x09\x00\x10\x00LO\x08\x00BOMBTEST"
    blob = b"\x09\x00\x10\x10OB\x00\x00" + struct.pack("<I", inflated_bytes)
    head = squeeze.compress(dataset[:pixel_tag] + creator + blob) + squeeze.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor forgets its history, so every 16 MiB run of zeros
    # compresses to the same bytes: compress one and repeat it.
    chunk = 2**24
    assert inflated_bytes % chunk == 0
    zeros = squeeze.compress(bytes(chunk)) + squeeze.flush(zlib.Z_FULL_FLUSH)
    tail = squeeze.compress(dataset[pixel_tag:]) + squeeze.flush()
    return meta + head + zeros * (inflated_bytes // chunk) + tail


def deflated(dicom: bytes) -> bytes:
    """The same DICOM file with its dataset deflated (transfer syntax 1.2.840.10008.1.2.1.99)."""
    meta, dataset = _split_after_meta(dicom)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = squeeze.compress(dataset) + squeeze.flush()
    return with_transfer_syntax(meta, "1.2.840.10008.1.2.1.99") + body


def zeros_after_meta(dicom: bytes, zero_bytes: int) -> bytes:
    """A DICOM file whose dataset starts with `zero_bytes` zeros: a cheap CPU burn for a parser
    that walks them element by element."""
    meta, dataset = _split_after_meta(dicom)
    return meta + bytes(zero_bytes) + dataset


def zeros_in_sequence(dicom: bytes, zero_bytes: int) -> bytes:
    """A DICOM file whose first element is a sequence of undefined length holding one item of
    `zero_bytes` zeros: the same CPU burn, where pydicom's stop_when hook is never consulted."""
    meta, dataset = _split_after_meta(dicom)
    sequence = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1115), undefined length
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    return meta + sequence + item + bytes(zero_bytes) + dataset


def relabelled(dicom: bytes, uid: str) -> bytes:
    """The same DICOM file claiming transfer syntax `uid` (the dataset itself unchanged)."""
    meta, dataset = _split_after_meta(dicom)
    return with_transfer_syntax(meta, uid) + dataset
