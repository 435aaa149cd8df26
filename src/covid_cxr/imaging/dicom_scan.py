"""A quick walk over the element headers of a DICOM dataset, before pydicom parses it.

pydicom parses a run of zero bytes as an endless series of empty group-0000 elements, about
half a second per MB, also inside a sequence of undefined length where no hook of its own can
stop it. This walk reads only the headers (8 or 12 bytes each, values skipped by their length,
sequences and items entered) and refuses the first element no DICOM file holds, or a header
with more than MAX_ELEMENTS elements. It stops at the pixel data, or at the end of the bytes
(pydicom then reports the truncation), so a real header costs a few hundred steps.
"""

from __future__ import annotations

import struct

MAX_ELEMENTS = 100_000
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = (0x7FE0, 0x0010)
ITEM_GROUP = 0xFFFE
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS.add(b"UV")


class NotAHeader(Exception):
    """The bytes are not DICOM elements; the message says what was found."""


def looks_explicit(data: bytes, position: int) -> bool:
    """Whether the element at `position` carries a VR (two capital letters), as pydicom guesses
    for a dataset without file meta and for writers that switch to implicit VR mid-file."""
    vr = data[position + 4 : position + 6]
    return len(vr) == 2 and all(65 <= byte <= 90 for byte in vr)


def _step(data: bytes, position: int, implicit: bool) -> int:
    """Bytes from this element to the next header: past its value, or into a sequence (or
    encapsulated data) whose items follow."""
    if implicit or not looks_explicit(data, position):
        (length,) = struct.unpack_from("<I", data, position + 4)
        return 8 if length == UNDEFINED else 8 + length
    vr = data[position + 4 : position + 6]
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<I", data, position + 8)
        return 12 if length == UNDEFINED or vr == b"SQ" else 12 + length
    (length,) = struct.unpack_from("<H", data, position + 6)
    return 8 + length


def scan(data: bytes, start: int, *, implicit: bool) -> None:
    """Walk the little-endian dataset at `start`; raise NotAHeader on bytes that are no header."""
    position, end = start, len(data)
    for _ in range(MAX_ELEMENTS):
        if position + 12 > end:
            return
        group, element = struct.unpack_from("<HH", data, position)
        if group == 0:
            raise NotAHeader("elements of group 0000 (what a run of zero bytes reads as)")
        if group == ITEM_GROUP:
            position += 8  # an item or delimiter: the item's own elements follow
            continue
        if (group, element) == PIXEL_DATA:
            return
        position += _step(data, position, implicit)
    raise NotAHeader(f"more than {MAX_ELEMENTS:,} header elements")
