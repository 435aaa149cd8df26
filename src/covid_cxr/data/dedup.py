"""Finding the same picture twice: perceptual hashes, near-duplicate pairs, union-find groups.

Public collections re-use images: the same radiograph at another resolution or re-encoded
(Kaggle's 224-px `chest_xray` and the full-size `kaggle-normal-196`), or one figure filed under
two patient ids. A split that puts such copies on both sides leaks the answer, so copies are
grouped with the patient ids and a group is assigned to one split as a whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8 x 8 low-frequency DCT coefficients -> 64-bit hash
_SAMPLE = 32  # the radiograph is reduced to 32 x 32 before the DCT


def file_sha256(path: Path) -> str:
    """Content hash: the identity of an image file, whatever its name or folder."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(_SAMPLE)


def phash(pixels: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a (H, W) float image.

    Robust to resizing (including squashing to a square), re-encoding and small intensity
    changes, because only the coarsest structure of the image is kept.
    """
    small = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
    small = small.resize((_SAMPLE, _SAMPLE), Image.Resampling.BOX)
    coefficients = _DCT @ np.asarray(small, dtype=np.float64) @ _DCT.T
    low = coefficients[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phashes(pixels: np.ndarray) -> tuple[int, int]:
    """Hashes of the whole frame and of its central square.

    The second catches copies cropped to a square, as ieee8023 re-published Hannover images:
    of the 82 such pairs in the June-2020 snapshot, 5 have whole-frame hashes within 2 bits
    (up to 28 apart) but 64 have central-square hashes within 2 bits. (The other 18 are
    cropped off-centre; the ieee8023 reader links them by provenance instead.)
    """
    height, width = pixels.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return phash(pixels), phash(pixels[top : top + side, left : left + side])


def near_pairs(hashes: list[int], max_distance: int) -> list[tuple[int, int, int]]:
    """All index pairs (i < j) whose hashes differ in at most `max_distance` bits, with distance.

    Brute force over every pair in blocks: about 7,000 hashes take well under a second.
    """
    if max_distance < 0 or len(hashes) < 2:
        return []
    values = np.array(hashes, dtype=np.uint64)
    pairs = []
    block = 512
    for start in range(0, len(values), block):
        rows = values[start : start + block]
        distances = np.bitwise_count(rows[:, None] ^ values[None, :])
        for i, j in zip(*np.nonzero(distances <= max_distance), strict=True):
            a = start + int(i)
            if a < j:
                pairs.append((a, int(j), int(distances[i, j])))
    return pairs


class UnionFind:
    """Disjoint sets of hashable keys (patient ids): linking two keys merges their groups."""

    def __init__(self, keys: Iterable[Hashable] = ()) -> None:
        self._parent: dict[Hashable, Hashable] = {}
        for key in keys:
            self.add(key)

    def add(self, key: Hashable) -> None:
        self._parent.setdefault(key, key)

    def find(self, key: Hashable) -> Hashable:
        self.add(key)
        parent = self._parent
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def union(self, a: Hashable, b: Hashable) -> bool:
        """Merge the groups of a and b; True when they were separate."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return False
        self._parent[root_b] = root_a
        return True
