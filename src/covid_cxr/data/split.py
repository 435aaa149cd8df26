"""Patient-level stratified split: whole groups of images go to one split, never across two.

A group is everything that must stay together (a patient, plus the patients its images are
duplicates of). Groups are stratified by their main source and label, so every split gets the
same mix of hospitals and classes, and filled towards the target number of images per split,
which meets the ratios closely even though groups have different sizes.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence

from covid_cxr.config import SplitConfig


def split_ratios(config: SplitConfig) -> dict[str, float]:
    return {"train": config.train, "val": config.val, "test": config.test}


def assign_groups(
    sizes: Sequence[int], strata: Sequence[Hashable], config: SplitConfig
) -> list[str]:
    """The split of each group, given its number of images and its stratum.

    Within a stratum groups come in a seeded random order and each goes to the split that is
    least full relative to its target. The choice ignores the group's size, so patients with
    many images are not drawn to one split; same inputs and seed, same result.
    """
    ratios = {name: ratio for name, ratio in split_ratios(config).items() if ratio > 0}
    rng = random.Random(config.seed)
    by_stratum: dict[Hashable, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        by_stratum[stratum].append(index)
    assignment = [""] * len(sizes)
    for stratum in sorted(by_stratum, key=repr):
        members = by_stratum[stratum]
        rng.shuffle(members)
        filled: Counter[str] = Counter()
        for index in members:
            split = min(ratios, key=lambda name: filled[name] / ratios[name])
            assignment[index] = split
            filled[split] += sizes[index]
    return assignment
