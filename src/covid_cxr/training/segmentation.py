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

import math
import multiprocessing
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from covid_cxr.config import TrainConfig
from covid_cxr.data.masks import SOURCES, MaskRecord, load_mask_manifest, read_mask
from covid_cxr.errors import ConfigError, CovidCxrError, DataError, failure_reason
from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph
from covid_cxr.segmentation.masks import mask_to_input
from covid_cxr.training import distributed
from covid_cxr.training.augment import augment_batch, describe
from covid_cxr.training.dataset import Split, Unreadable, group_weights
from covid_cxr.training.distributed import Context
from covid_cxr.training.history import Panel
from covid_cxr.training.steps import LossFunction
from covid_cxr.training.tasks import TaskData, register

TASK = "segmentation"
nan = math.nan
SELECT_METRICS = ("val_dice", "val_dice_balanced")
COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_dice",
    "val_loss",
    "val_dice",
    "val_dice_balanced",
    *(f"val_dice_{source}" for source in SOURCES),
    "images_per_s",
    "seconds",
)
PANELS = (
    Panel("loss", "loss (BCE + soft Dice)"),
    Panel("dice", "Dice", (("val_dice_balanced", "validation, sources balanced"),)),
)


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
    def sources(self) -> list[str]:
        return sorted({record.source for record in self.records})

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


def image_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) BCE with logits + (1 - soft Dice) of each image."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    soft = (2 * inter + 1.0) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1.0)
    return bce + (1.0 - soft)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: `image_losses` averaged over the batch."""
    return image_losses(logits, target).mean()


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
    out["dice_balanced"] = float(np.mean([np.mean(v) for v in by_source.values()]))
    for source in SOURCES:
        out[f"dice_{source}"] = float(np.mean(by_source[source])) if source in by_source else nan
    return out


def build_mask_cache(
    records: list[MaskRecord], config: TrainConfig, context: Context, split: str
) -> MaskCache:
    """Decode this split once; under torchrun each process decodes its share and they swap."""
    part = decode_pairs(
        records[distributed.shard(context, len(records))],
        config.preprocess,
        workers=config.runtime.decode_workers,
    )
    if context.distributed:
        parts = distributed.gather(context, part)
        part = MaskCache(
            images=torch.cat([p.images for p in parts]),
            masks=torch.cat([p.masks for p in parts]),
            records=[r for p in parts for r in p.records],
            unreadable=[u for p in parts for u in p.unreadable],
        )
    if not len(part):
        raise DataError(f"none of the {len(records)} {split} image/mask pairs could be read")
    return part


@register(TASK)
class SegmentationTask:
    """Lung masks: (N, 1, S, S) logits per image, BCE + soft Dice, Dice per source."""

    name: ClassVar[str] = TASK
    columns = COLUMNS
    panels = PANELS

    def __init__(self, config: TrainConfig) -> None:
        if config.select_metric not in SELECT_METRICS:
            raise ConfigError(
                f"task segmentation selects epochs on {' or '.join(SELECT_METRICS)}; "
                f"select_metric is {config.select_metric!r}"
            )
        if config.sampling.class_weights != "none":
            raise ConfigError("sampling.class_weights is for classification; use 'none'")
        self.config = config
        self.select_metric: str = config.select_metric

    def load(self, context: Context, progress: bool) -> TaskData:
        train_records, val_records = load_mask_splits(self.config)
        train = build_mask_cache(train_records, self.config, context, "train")
        val = build_mask_cache(val_records, self.config, context, "val")
        return TaskData(train=train, val=val)

    def sample_weights(self, train: Split) -> torch.Tensor | None:
        if self.config.sampling.sampler != "source_balanced":
            return None
        return group_weights(_cache(train).groups)

    def loss_function(self, train: Split) -> LossFunction:
        return segmentation_loss

    def augment(
        self, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_batch(inputs, self.config.augment, generator, masks=targets)

    def keep(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: (Dice, loss) as outputs, the mask's area fraction as target."""
        kept = torch.stack([hard_dice(outputs, targets).float(), image_losses(outputs, targets)], 1)
        return kept, targets.float().mean((1, 2, 3))

    def train_metrics(
        self, outputs: np.ndarray, targets: np.ndarray, loss: float
    ) -> dict[str, float]:
        return {"loss": float(loss), "dice": float(np.mean(outputs[:, 0]))}

    def val_metrics(self, outputs: np.ndarray, targets: np.ndarray, val: Split) -> dict[str, float]:
        sources = [record.source for record in _cache(val).records]
        return {"loss": float(np.mean(outputs[:, 1])), **dice_summary(outputs[:, 0], sources)}

    def describe(self, row: dict[str, Any]) -> str:
        per_source = " ".join(
            f"{s} {row[f'val_dice_{s}']:.4f}"
            for s in SOURCES
            if not math.isnan(row[f"val_dice_{s}"])
        )
        return (
            f"loss {row['train_loss']:.4f} dice {row['train_dice']:.4f} | val loss "
            f"{row['val_loss']:.4f} dice {row['val_dice']:.4f} (balanced "
            f"{row['val_dice_balanced']:.4f}; {per_source})"
        )

    def metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: row[k] for k in COLUMNS if k.startswith("val_dice")}

    def result(self, best: dict[str, Any] | None) -> dict[str, float | None]:
        keys = [k for k in COLUMNS if k.startswith("val_")]
        # A source absent from validation has no Dice: null in metrics.json, not NaN.
        return {k: None if not best or math.isnan(best[k]) else best[k] for k in keys}

    def log_setup(self) -> str:
        return (
            f"augmentation (image and mask): {describe(self.config.augment)}; sampler "
            f"{self.config.sampling.sampler}; loss BCE + soft Dice"
        )


def _cache(split: Split) -> MaskCache:
    assert isinstance(split, MaskCache)
    return split
