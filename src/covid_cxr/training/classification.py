"""The classification task: COVID-19 or not, from a manifest of labelled radiographs.

Data: the manifest's "train" and "val" rows (optionally some sources only), decoded once into
`CachedImages`. Loss: BCE with logits, optionally class-weighted. Metrics: loss, accuracy and
ROC AUC, plus a validation AUC with every (source, class) group weighted equally; best.pt is
the epoch with the best `select_metric` (val_auc or val_auc_balanced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from covid_cxr.config import TrainConfig
from covid_cxr.data.manifest import ManifestRow, load_manifest
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.training import distributed
from covid_cxr.training.augment import augment_batch, describe
from covid_cxr.training.dataset import (
    CachedImages,
    Split,
    class_weights,
    decode_images,
    group_weights,
    select_rows,
)
from covid_cxr.training.distributed import Context
from covid_cxr.training.history import Panel, binary_metrics
from covid_cxr.training.steps import LossFunction
from covid_cxr.training.tasks import TaskData, register

COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "train_auc",
    "val_loss",
    "val_acc",
    "val_auc",
    "val_auc_balanced",
    "images_per_s",
    "seconds",
)

PANELS = (
    Panel("loss", "loss"),
    Panel("acc", "accuracy"),
    Panel("auc", "ROC AUC", (("val_auc_balanced", "validation, groups balanced"),)),
)


def load_splits(config: TrainConfig) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """Train and validation rows, refusing data a model cannot be trained or selected on."""
    manifest = Path(config.manifest)
    if not manifest.is_file():
        raise DataError(
            f"{manifest}: manifest not found; build it first with `covid-cxr data build` "
            f"or point `manifest` in the training config at an existing one"
        )
    rows = load_manifest(manifest)
    sampling = config.sampling
    known = {row.source for row in rows}
    unknown = sorted((set(sampling.train_sources) | set(sampling.exclude_sources)) - known)
    if unknown:
        raise ConfigError(
            f"sampling names source(s) {unknown} that {manifest} does not contain; "
            f"its sources are {sorted(known)}"
        )
    splits = {}
    for split in ("train", "val"):
        chosen = select_rows(
            rows,
            split,
            sampling.train_sources,
            sampling.exclude_sources,
            config.max_images,
            config.seed,
        )
        if not chosen:
            filtered = sampling.train_sources or sampling.exclude_sources
            raise DataError(
                f"{manifest}: no {split!r} rows{' from the selected sources' if filtered else ''}; "
                "the trainer fits on split 'train' and selects epochs on split 'val'"
            )
        check_classes(chosen, f"{manifest} ({split} split)")
        splits[split] = chosen
    return splits["train"], splits["val"]


def check_classes(rows: list[ManifestRow], where: str) -> None:
    covid = sum(row.target for row in rows)
    if covid == 0 or covid == len(rows):
        only = "COVID-19" if covid else "non-COVID"
        raise DataError(
            f"{where}: all {len(rows)} images are {only}; training and AUC need both COVID-19 "
            "and non-COVID images"
        )


def build_cache(
    rows: list[ManifestRow], config: TrainConfig, context: Context, split: str, progress: bool
) -> CachedImages:
    """Decode this split once; under torchrun each process decodes its share and they swap."""
    runtime = config.runtime
    part = decode_images(
        rows[distributed.shard(context, len(rows))],
        config.preprocess,
        dtype=runtime.cache_dtype,
        workers=runtime.decode_workers,
        cache_dir=runtime.cache_dir or None,
        desc=f"decoding {split}",
        progress=progress and context.main,
    )
    if context.distributed:
        parts = distributed.gather(context, part)
        part = CachedImages(
            images=torch.cat([p.images for p in parts]),
            targets=torch.cat([p.targets for p in parts]),
            rows=[r for p in parts for r in p.rows],
            unreadable=[u for p in parts for u in p.unreadable],
        )
    if not len(part):
        raise DataError(f"none of the {len(rows)} {split} images could be read")
    check_classes(part.rows, f"{split} split after leaving out unreadable images")
    return part


def bce(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(
        F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(targets))
    )


@register("classification")
class ClassificationTask:
    """COVID-19 vs the rest: one logit per image, BCE, accuracy and ROC AUC."""

    name: ClassVar[str] = "classification"
    columns = COLUMNS
    panels = PANELS

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.select_metric: str = config.select_metric

    def load(self, context: Context, progress: bool) -> TaskData:
        train_rows, val_rows = load_splits(self.config)
        train = build_cache(train_rows, self.config, context, "train", progress)
        val = build_cache(val_rows, self.config, context, "val", progress)
        return TaskData(train=train, val=val)

    def sample_weights(self, train: Split) -> torch.Tensor | None:
        if self.config.sampling.sampler != "source_balanced":
            return None
        return group_weights(_cached(train).groups)

    def loss_function(self, train: Split) -> LossFunction:
        weights = None
        if self.config.sampling.class_weights == "balanced":
            weights = class_weights(_cached(train).targets)

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            weight = None if weights is None else weights.to(logits.device)[targets.long()]
            return F.binary_cross_entropy_with_logits(logits, targets, weight=weight)

        return loss

    def augment(
        self, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_batch(inputs, self.config.augment, generator), targets

    def keep(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs, targets

    def train_metrics(
        self, outputs: np.ndarray, targets: np.ndarray, loss: float
    ) -> dict[str, float]:
        return binary_metrics(targets, outputs, loss)

    def val_metrics(self, outputs: np.ndarray, targets: np.ndarray, val: Split) -> dict[str, float]:
        balanced = group_weights(_cached(val).groups).numpy()
        return binary_metrics(targets, outputs, bce(outputs, targets), balanced=balanced)

    def describe(self, row: dict[str, Any]) -> str:
        return (
            f"loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} auc {row['train_auc']:.3f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} auc {row['val_auc']:.3f}"
            f" (balanced {row['val_auc_balanced']:.3f})"
        )

    def metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "val_auc": row["val_auc"],
            "val_auc_balanced": row["val_auc_balanced"],
            "val_accuracy": row["val_acc"],
        }

    def result(self, best: dict[str, Any] | None) -> dict[str, float | None]:
        keys = {
            "val_accuracy": "val_acc",
            "val_auc": "val_auc",
            "val_auc_balanced": "val_auc_balanced",
            "val_loss": "val_loss",
        }
        return {name: best[column] if best else None for name, column in keys.items()}

    def log_setup(self) -> str:
        return (
            f"augmentation: {describe(self.config.augment)}; sampler {self.config.sampling.sampler}"
        )


def _cached(split: Split) -> CachedImages:
    """The classification task's own splits are CachedImages (groups and targets by row)."""
    assert isinstance(split, CachedImages)
    return split
