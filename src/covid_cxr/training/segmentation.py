"""Lung segmentation under `covid-cxr train` (config `task = "segmentation"`).

Data: a lung-mask manifest (`covid-cxr data masks`): rows of split "train" fit, "val" select
the epoch. Each image goes through `preprocess` (the one preprocessing function) and its mask
through the same crop and resize (`mask_to_input`), once, into an in-memory cache.

Augmentation: `augment_batch` applied to image and mask stacked as two channels, so both get
the same geometric change; intensity jitter is then applied to the image alone.

Loss: binary cross-entropy + soft Dice (per image, averaged); metric: Dice of the thresholded
prediction (p > 0.5) against the mask (> 0.5) at model resolution, per image, averaged over the
split (`val_dice`) or over each source's mean (`val_dice_balanced`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covid_cxr.config import AugmentConfig, TrainConfig
from covid_cxr.data.masks import MaskRecord, load_mask_manifest, read_mask
from covid_cxr.errors import ConfigError, CovidCxrError, DataError, failure_reason
from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph
from covid_cxr.segmentation.masks import mask_to_input
from covid_cxr.training.augment import augment_batch
from covid_cxr.training.dataset import Unreadable

TASK = "segmentation"
SELECT_METRICS = ("val_dice", "val_dice_balanced")
_NO_INTENSITY = {"brightness": 0.0, "contrast": 0.0, "gamma": 0.0}
_NO_GEOMETRY = {
    "hflip": False,
    "shear": 0.0,
    "zoom": 0.0,
    "rotation": 0.0,
    "translate": 0.0,
    "crop_scale": 1.0,
}


@dataclass
class MaskCache:
    """Preprocessed images and their soft masks (float16, (N, 1, S, S)) of one split."""

    images: torch.Tensor
    masks: torch.Tensor
    records: list[MaskRecord]
    unreadable: list[Unreadable] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float(), self.masks[index].float()

    @property
    def groups(self) -> list[tuple[str, int]]:
        """(source, 0) per image: the balanced sampler draws every source equally often."""
        return [(record.source, 0) for record in self.records]

    def summary(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for record in self.records:
            counts[record.source] += 1
        text = f"{len(self)} masks ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
        return text + (f", {len(self.unreadable)} unreadable left out" if self.unreadable else "")


def _decode_pair(task: tuple[str, str, PreprocessConfig]) -> tuple[np.ndarray, np.ndarray] | str:
    """Worker: one image and its mask at model size, or the reason they cannot be used."""
    image, mask, config = task
    try:
        pixels = read_radiograph(image).pixels
        lungs = read_mask(mask)
    except (CovidCxrError, OSError, ValueError) as exc:
        return failure_reason(exc)
    if lungs.shape != pixels.shape:
        return f"mask size {lungs.shape[::-1]} differs from the image's {pixels.shape[::-1]}"
    return preprocess(pixels, config).astype(np.float16), mask_to_input(lungs, config).astype(
        np.float16
    )


def decode_pairs(
    records: Sequence[MaskRecord], config: PreprocessConfig, workers: int = 2
) -> MaskCache:
    tasks = [(str(r.image), str(r.mask), config) for r in records]
    if workers > 0 and len(tasks) > 1:
        context = multiprocessing.get_context("spawn")  # never fork a process running torch
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_decode_pair, tasks, chunksize=8))
    else:
        results = [_decode_pair(task) for task in tasks]
    size = config.size
    images = torch.zeros((len(records), 1, size, size), dtype=torch.float16)
    masks = torch.zeros_like(images)
    keep, unreadable = [], []
    for i, result in enumerate(results):
        if isinstance(result, str):
            unreadable.append(Unreadable(str(records[i].image), result))
            continue
        images[i, 0], masks[i, 0] = torch.from_numpy(result[0]), torch.from_numpy(result[1])
        keep.append(i)
    index = torch.tensor(keep, dtype=torch.long)
    return MaskCache(images[index], masks[index], [records[i] for i in keep], unreadable)


def load_mask_splits(config: TrainConfig) -> tuple[list[MaskRecord], list[MaskRecord]]:
    """Train and val records of the mask manifest (at most `max_images` each, seeded)."""
    manifest = Path(config.manifest)
    if not manifest.is_file():
        raise DataError(
            f"{manifest}: lung-mask manifest not found; build it with "
            f"`covid-cxr data masks --out {manifest}`"
        )
    records = load_mask_manifest(manifest)
    sampling = config.sampling
    splits = []
    for split in ("train", "val"):
        chosen = [
            r
            for r in records
            if r.split == split
            and (not sampling.train_sources or r.source in sampling.train_sources)
            and r.source not in sampling.exclude_sources
        ]
        if config.max_images and len(chosen) > config.max_images:
            rng = np.random.default_rng(config.seed)
            picked = rng.choice(len(chosen), config.max_images, replace=False)
            chosen = [chosen[i] for i in sorted(picked)]
        if not chosen:
            raise DataError(f"{manifest}: no {split!r} rows to train on")
        splits.append(chosen)
    return splits[0], splits[1]


def augment_pair(
    images: torch.Tensor,
    masks: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One geometric change for image and mask together, intensity jitter for the image."""
    both = augment_batch(
        torch.cat([images, masks], 1), dataclasses.replace(config, **_NO_INTENSITY), generator
    )
    image = augment_batch(both[:, :1], dataclasses.replace(config, **_NO_GEOMETRY), generator)
    return image, both[:, 1:]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits + (1 - soft Dice), per image, averaged over the batch."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    soft = (2 * inter + 1.0) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1.0)
    return bce + (1.0 - soft).mean()


def hard_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) Dice of (logit > 0) against (target > 0.5); 1 when both are empty."""
    a, b = logits.float() > 0, target > 0.5
    inter = (a & b).sum((1, 2, 3)).double()
    total = a.sum((1, 2, 3)).double() + b.sum((1, 2, 3)).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def dice_summary(dice: np.ndarray, sources: Iterable[str]) -> dict[str, float]:
    """Mean Dice overall, per source (`dice_<source>`) and over the per-source means."""
    by_source: dict[str, list[float]] = defaultdict(list)
    for value, source in zip(dice, sources, strict=True):
        by_source[source].append(float(value))
    out = {"dice": float(np.mean(dice)) if len(dice) else float("nan")}
    out.update({f"dice_{s}": float(np.mean(v)) for s, v in sorted(by_source.items())})
    out["dice_balanced"] = float(np.mean([np.mean(v) for v in by_source.values()]))
    return out


def check_config(config: TrainConfig) -> None:
    if config.select_metric not in SELECT_METRICS:
        raise ConfigError(
            f"segmentation selects epochs on {' or '.join(SELECT_METRICS)}; "
            f"select_metric is {config.select_metric!r}"
        )
    if config.sampling.class_weights != "none":
        raise ConfigError("sampling.class_weights applies to classification only; use 'none'")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
