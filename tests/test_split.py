"""Patient-group split, perceptual hashes and union-find: the pieces that keep splits leak-free."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.config import DataRecipe, SplitConfig, from_dict
from covid_cxr.data.dedup import UnionFind, near_pairs, phash, phashes
from covid_cxr.data.split import assign_groups
from covid_cxr.errors import ConfigError


def _groups(count: int = 600, seed: int = 0) -> tuple[list[int], list[str]]:
    rng = random.Random(seed)
    sizes = [rng.choice((1, 1, 1, 2, 3, 5)) for _ in range(count)]
    strata = [rng.choice(("kaggle/Normal", "kaggle/Pneumonia", "ieee/COVID")) for _ in sizes]
    return sizes, strata


def test_split_meets_ratios_per_stratum() -> None:
    sizes, strata = _groups()
    config = SplitConfig(train=0.7, val=0.15, test=0.15, seed=1)
    splits = assign_groups(sizes, strata, config)
    for stratum in set(strata):
        images = Counter()
        for size, group_stratum, split in zip(sizes, strata, splits, strict=True):
            if group_stratum == stratum:
                images[split] += size
        total = sum(images.values())
        for name, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(images[name] / total - ratio) < 0.02, (stratum, images)


def test_split_is_deterministic_per_seed() -> None:
    sizes, strata = _groups()
    first = assign_groups(sizes, strata, SplitConfig(seed=7))
    assert assign_groups(sizes, strata, SplitConfig(seed=7)) == first
    assert assign_groups(sizes, strata, SplitConfig(seed=8)) != first


def test_zero_ratio_split_stays_empty() -> None:
    sizes, strata = _groups(100)
    splits = assign_groups(sizes, strata, SplitConfig(train=0.75, val=0.25, test=0.0))
    assert set(splits) == {"train", "val"}


@pytest.mark.parametrize(
    "split",
    [{"train": 0.7, "val": 0.2, "test": 0.2}, {"train": 0.0, "val": 0.5, "test": 0.5}],
)
def test_bad_ratios_are_config_errors(split: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="must be non-negative, train > 0, and sum to 1"):
        from_dict(
            DataRecipe, {"name": "x", "sources": [{"kind": "nih", "path": "n"}], "split": split}
        )


def test_recipe_refuses_unknown_keys_and_negative_limits() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DataRecipe, {"name": "x", "sources": [{"kind": "nih", "path": "n", "hold": 1}]})
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        from_dict(DataRecipe, {"name": "x", "sources": [{"kind": "nih", "path": "n", "limit": -1}]})


def test_union_find_merges_transitively() -> None:
    groups = UnionFind(["a", "b", "c", "d"])
    assert groups.union("a", "b")
    assert groups.union("c", "b")
    assert not groups.union("a", "c")
    assert groups.find("a") == groups.find("c") != groups.find("d")


def _radiograph(datasets: Path) -> np.ndarray:
    path = datasets / "covid-19-image-repository" / "png" / "006f3a8a.png"
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255


def test_phash_survives_resizing_and_squashing_but_tells_images_apart(datasets: Path) -> None:
    pixels = _radiograph(datasets)
    image = Image.fromarray(pixels, mode="F")
    squashed = np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR))
    brighter = np.clip(pixels * 1.1 + 0.02, 0, 1)
    other = np.asarray(
        Image.open(datasets / "covid-19-image-repository" / "png" / "00870a9c.png").convert("L"),
        dtype=np.float32,
    )
    hashes = [phash(pixels), phash(squashed), phash(brighter), phash(other / 255)]
    pairs = {(a, b): d for a, b, d in near_pairs(hashes, 2)}
    assert (0, 1) in pairs and (0, 2) in pairs
    assert not any(3 in pair for pair in pairs)
    assert near_pairs(hashes, -1) == []


def test_square_hash_catches_a_square_cropped_copy(datasets: Path) -> None:
    """As ieee8023 re-published Hannover images: central square, enlarged to 640 x 640."""
    pixels = _radiograph(datasets)
    height, width = pixels.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(pixels[top : top + side, left : left + side], mode="F")
    copy = np.asarray(crop.resize((640, 640), Image.Resampling.BILINEAR))
    whole, square = phashes(pixels)
    copy_whole, copy_square = phashes(copy)
    assert copy_whole == copy_square  # a square image's central square is itself
    assert bin(whole ^ copy_whole).count("1") > 2  # the whole-frame hash misses it...
    assert bin(square ^ copy_square).count("1") <= 2  # ...the central-square hash does not
