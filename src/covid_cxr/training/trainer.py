"""`covid-cxr train`: fit a model from a manifest and leave a self-describing run folder.

runs/<name>/ (or --out): config.toml (the resolved config), history.csv / history.png (loss,
accuracy and AUC per epoch, train and validation), best.pt (the epoch with the best validation
AUC, what evaluation and export use), last.pt (for --resume) and metrics.json.

The same command runs under `torchrun` (DistributedDataParallel; `batch_size` is the global
batch, split over the processes); only the main process logs and writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from covid_cxr.config import OptimConfig, TrainConfig, dump_toml, to_dict
from covid_cxr.data.manifest import ManifestRow, load_manifest
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.models import accepts, create
from covid_cxr.models.checkpoint import ModelInfo, read_checkpoint, save_checkpoint
from covid_cxr.training import distributed
from covid_cxr.training.augment import augment_batch, describe
from covid_cxr.training.dataset import (
    CachedImages,
    EpochSampler,
    class_weights,
    decode_images,
    group_weights,
    select_rows,
)
from covid_cxr.training.distributed import Context
from covid_cxr.training.history import binary_metrics, plot, write_csv
from covid_cxr.training.runtime import configure_cpu


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Channels-last strides, also for one channel: there `.contiguous(channels_last)` is a no-op
    that keeps channels-first strides, so the first convolution writes a channels-first map and
    every later layer pays for reordering it (forward and backward)."""
    if x.shape[1] == 1:
        n, _, h, w = x.shape
        return x.contiguous().reshape(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def model_options(config: TrainConfig) -> dict[str, Any]:
    """The model's options as trained; the input size is filled in for models that need it."""
    options = {k: v for k, v in config.model.options.items() if k != "pretrained"}
    if accepts(config.model.name, "size"):
        options.setdefault("size", config.preprocess.size)
    return options


def weights_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:8]


# ---------------------------------------------------------------- data


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
    # Contiguous shares, so that concatenating them keeps the manifest order on every process.
    share = -(-len(rows) // context.world)
    mine = rows[context.rank * share : (context.rank + 1) * share]
    part = decode_images(
        mine,
        config.preprocess,
        dtype=runtime.cache_dtype,
        workers=runtime.decode_workers,
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


# ---------------------------------------------------------------- schedule


@dataclasses.dataclass
class Schedule:
    """Learning rate per step: warmup, then none/cosine/step, times a plateau factor."""

    optim: OptimConfig
    epochs: int
    plateau_scale: float = 1.0
    plateau_best: float = -math.inf
    plateau_bad: int = 0

    def lr(self, position: float) -> float:
        """`position`: epochs done so far, fractional within an epoch."""
        o = self.optim
        if o.warmup_epochs and position < o.warmup_epochs:
            return o.lr * max(position, 1e-3) / o.warmup_epochs
        factor = 1.0
        if o.schedule == "cosine":
            span = max(self.epochs - o.warmup_epochs, 1)
            t = min((position - o.warmup_epochs) / span, 1.0)
            floor = o.min_lr / o.lr
            factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        elif o.schedule == "step":
            factor = o.factor ** int(position // o.step_epochs)
        return o.lr * factor * self.plateau_scale

    def observe(self, score: float) -> None:
        """The epoch's model-selection score (validation AUC) drives the plateau schedule."""
        if self.optim.schedule != "plateau" or math.isnan(score):
            return
        if score > self.plateau_best:
            self.plateau_best, self.plateau_bad = score, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > self.optim.plateau_patience:
            self.plateau_scale *= self.optim.factor
            self.plateau_bad = 0

    def state(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("plateau_scale", "plateau_best", "plateau_bad")}


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(
        params, lr=optim.lr, momentum=0.9, nesterov=True, weight_decay=optim.weight_decay
    )


# ---------------------------------------------------------------- steps


def autocast(config: TrainConfig, device: torch.device):  # type: ignore[no-untyped-def]
    if not config.runtime.bf16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare(images: torch.Tensor, config: TrainConfig, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return to_channels_last(images) if config.runtime.channels_last else images


@torch.no_grad()
def predict(
    model: nn.Module, cache: CachedImages, config: TrainConfig, context: Context
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of the whole split (each process scores its share)."""
    model.eval()
    share = -(-len(cache) // context.world)  # contiguous shares keep the split's order
    mine = torch.arange(len(cache))[context.rank * share : (context.rank + 1) * share]
    logits = []
    for start in range(0, len(mine), config.runtime.eval_batch_size):
        images, _ = cache.batch(mine[start : start + config.runtime.eval_batch_size])
        with autocast(config, context.device):
            logits.append(model(prepare(images, config, context.device)).float().cpu())
    local = torch.cat(logits) if logits else torch.empty(0)
    parts = distributed.gather(context, (local.numpy(), cache.targets[mine].numpy()))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    generator: torch.Generator | None = None,
    loss_weights: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """Augment, forward (bf16 autocast), BCE with logits, backward, update.

    Returns the batch loss and the logits (on the CPU) for the epoch's training metrics.
    """
    x = prepare(augment_batch(images, config.augment, generator), config, device)
    y = targets.to(device)
    with autocast(config, device):
        logits = model(x)
    weight = None if loss_weights is None else loss_weights.to(device)[y.long()]
    loss = F.binary_cross_entropy_with_logits(logits.float(), y, weight=weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), logits.detach().float().cpu()


def bce(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(
        F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(targets))
    )


class Trainer:
    """One training run; `run()` returns the metrics written to metrics.json."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: Path,
        resume: Path | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))

    def log(self, text: str) -> None:
        if self.context.main:
            self._log(text)

    def run(self) -> dict[str, Any]:
        self.context = distributed.setup(self.config.runtime.device)
        try:
            return self._run()
        finally:
            distributed.teardown(self.context)

    # -------------------------------------------------------- setup

    def _build_model(self) -> tuple[nn.Module, dict[str, Any]]:
        options = model_options(self.config)
        # A resumed run takes every weight from its checkpoint.
        pretrained = bool(self.config.model.options.get("pretrained")) and self.resume is None
        model = create(self.config.model.name, **options, pretrained=pretrained)
        model = model.to(self.context.device)
        if self.config.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, options

    def _run(self) -> dict[str, Any]:
        config, context = self.config, self.context
        started = time.perf_counter()
        if context.device.type == "cpu":
            configure_cpu(config.runtime.threads, config.runtime.reuse_memory)
        seed_everything(config.seed)
        if config.batch_size % context.world:
            raise ConfigError(
                f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                f"{context.world} processes"
            )
        train_rows, val_rows = load_splits(config)
        train = build_cache(train_rows, config, context, "train", self.progress)
        val = build_cache(val_rows, config, context, "val", self.progress)
        self.log(f"train: {train.summary()}; sources {sorted({r.source for r in train.rows})}")
        self.log(f"val:   {val.summary()}")

        model, options = self._build_model()
        optimizer = make_optimizer(model, config.optim)
        schedule = Schedule(config.optim, config.epochs)
        history: list[dict[str, Any]] = []
        best_auc, best_epoch, start_epoch = -math.inf, 0, 1
        if self.resume is not None:
            state = self._load_resume(model, optimizer, options)
            history, best_auc, best_epoch = state["history"], state["best_auc"], state["best_epoch"]
            start_epoch = state["epoch"] + 1
            if start_epoch > config.epochs:
                raise ConfigError(
                    f"{self.resume} has already trained {state['epoch']} epochs and the config "
                    f"asks for {config.epochs}; raise --epochs to continue"
                )
            for key, value in state["schedule"].items():
                setattr(schedule, key, value)
            self.log(f"resuming {self.resume} after epoch {state['epoch']}")

        core = model
        if config.runtime.compile:
            model = torch.compile(model)
        if context.distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

        sampler = EpochSampler(
            size=len(train),
            seed=config.seed,
            weights=group_weights(train.groups)
            if config.sampling.sampler == "source_balanced"
            else None,
            epoch_size=config.sampling.epoch_size,
            rank=context.rank,
            world=context.world,
        )
        loss_weights = (
            class_weights(train.targets) if config.sampling.class_weights == "balanced" else None
        )
        val_weights = group_weights(val.groups).numpy()
        if context.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(dump_toml(to_dict(config)), encoding="utf-8")
        self.log(
            f"model {config.model.name} {options}, {sum(p.numel() for p in core.parameters()):,} "
            f"parameters, on {context.device} x{context.world}; augmentation: "
            f"{describe(config.augment)}; sampler {config.sampling.sampler}"
        )

        stopped_early = False
        train_seconds, train_images = 0.0, 0
        stale = 0 if not history else history[-1]["epoch"] - best_epoch
        for epoch in range(start_epoch, config.epochs + 1):
            row, seconds, images = self._epoch(
                model, core, optimizer, schedule, sampler, train, loss_weights, epoch
            )
            train_seconds += seconds
            train_images += images
            logits, targets = predict(core, val, config, context)
            loss = bce(logits, targets)
            row.update({f"val_{k}": v for k, v in binary_metrics(targets, logits, loss).items()})
            balanced = binary_metrics(targets, logits, loss, val_weights)
            row["val_auc_balanced"] = balanced["auc"]
            history.append(row)
            score = row[config.select_metric]
            schedule.observe(score)
            improved = score > best_auc
            if improved:
                best_auc, best_epoch, stale = score, epoch, 0
            else:
                stale += 1
            if context.main:
                self._save(core, options, optimizer, schedule, history, epoch, best_epoch, improved)
            self.log(
                f"epoch {epoch}/{config.epochs}: loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.3f} auc {row['train_auc']:.3f} | val loss "
                f"{row['val_loss']:.4f} acc {row['val_acc']:.3f} auc {row['val_auc']:.3f} "
                f"(balanced {row['val_auc_balanced']:.3f})"
                f"{' *' if improved else ''} | {row['images_per_s']:.1f} img/s"
            )
            if config.patience and stale >= config.patience:
                stopped_early = True
                self.log(f"early stop: no val AUC gain for {stale} epochs (best {best_epoch})")
                break
        distributed.barrier(context)

        best = next((r for r in history if r["epoch"] == best_epoch), None)
        metrics = {
            "name": config.name,
            "model": config.model.name,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "stopped_early": stopped_early,
            "val_accuracy": best["val_acc"] if best else None,
            "val_auc": best["val_auc"] if best else None,
            "val_auc_balanced": best["val_auc_balanced"] if best else None,
            "selected_on": config.select_metric,
            "val_loss": best["val_loss"] if best else None,
            "train_images_per_s": train_images / train_seconds if train_seconds else None,
            "wall_seconds": time.perf_counter() - started,
            "peak_rss_mib": peak_rss_mib(),
            "device": str(context.device),
            "processes": context.world,
            "threads": torch.get_num_threads(),
            "n_train": len(train),
            "n_val": len(val),
            "train_sources": sorted({r.source for r in train.rows}),
            "unreadable": [dataclasses.asdict(u) for u in train.unreadable + val.unreadable],
        }
        if context.main:
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            self.log(
                f"best epoch {best_epoch}: val accuracy {metrics['val_accuracy']:.4f}, "
                f"AUC {metrics['val_auc']:.4f}; {metrics['train_images_per_s']:.1f} img/s, "
                f"peak RSS {metrics['peak_rss_mib']:.0f} MiB; run folder {self.out}"
            )
            for item in metrics["unreadable"]:
                self.log(f"  unreadable: {item['path']}: {item['reason']}")
        return metrics

    # -------------------------------------------------------- one epoch

    def _epoch(
        self,
        model: nn.Module,
        core: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        sampler: EpochSampler,
        train: CachedImages,
        loss_weights: torch.Tensor | None,
        epoch: int,
    ) -> tuple[dict[str, Any], float, int]:
        config, context = self.config, self.context
        # Seeding per epoch makes a resumed run repeat the uninterrupted one.
        seed_everything(config.seed * 1000 + epoch + context.rank)
        augment_rng = torch.Generator().manual_seed(config.seed * 7919 + epoch * 31 + context.rank)
        batches = sampler.batches(epoch, config.batch_size)
        model.train()
        logits_all, targets_all, loss_sum, seen = [], [], 0.0, 0
        bar = tqdm(
            total=sum(len(b) for b in batches) * context.world,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="img",
            disable=not (self.progress and context.main),
            leave=False,
        )
        start = time.perf_counter()
        for step, index in enumerate(batches):
            lr = schedule.lr(epoch - 1 + step / len(batches))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets = train.batch(index)
            loss, logits = train_step(
                model, optimizer, images, targets, config, context.device, augment_rng, loss_weights
            )
            loss_sum += loss * len(index)
            seen += len(index)
            logits_all.append(logits)
            targets_all.append(targets)
            bar.update(len(index) * context.world)
            rate = bar.n / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{rate:.1f}", lr=f"{lr:.2g}")
        seconds = time.perf_counter() - start
        bar.close()
        parts = distributed.gather(
            context, (torch.cat(logits_all).numpy(), torch.cat(targets_all).numpy(), loss_sum)
        )
        logits_np = np.concatenate([p[0] for p in parts])
        targets_np = np.concatenate([p[1] for p in parts])
        metrics = binary_metrics(targets_np, logits_np, sum(p[2] for p in parts) / len(logits_np))
        row = {
            "epoch": epoch,
            "lr": schedule.lr(epoch - 1),
            **{f"train_{k}": v for k, v in metrics.items()},
            "images_per_s": len(logits_np) / seconds,
            "seconds": seconds,
        }
        return row, seconds, len(logits_np)

    # -------------------------------------------------------- checkpoints

    def _info(self, core: nn.Module, options: dict[str, Any], epoch: int) -> ModelInfo:
        config = self.config
        date = datetime.now(UTC).strftime("%Y%m%d")
        return ModelInfo(
            name=config.model.name,
            options=options,
            preprocess=config.preprocess,
            version=f"{config.name}-{date}-{weights_hash(core)}",
            metadata={
                "train_config": config.name,
                "manifest": str(config.manifest),
                "epoch": epoch,
                "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "train_sources": sorted(set(config.sampling.train_sources)) or "all but excluded",
                "exclude_sources": list(config.sampling.exclude_sources),
            },
        )

    def _save(
        self,
        core: nn.Module,
        options: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        history: list[dict[str, Any]],
        epoch: int,
        best_epoch: int,
        improved: bool,
    ) -> None:
        info = self._info(core, options, epoch)
        row = history[-1]
        info.metadata.update(
            val_auc=row["val_auc"],
            val_auc_balanced=row["val_auc_balanced"],
            val_accuracy=row["val_acc"],
        )
        if improved:
            save_checkpoint(self.out / "best.pt", core, info, epoch=epoch)
        best = next(r for r in history if r["epoch"] == best_epoch)
        save_checkpoint(
            self.out / "last.pt",
            core,
            info,
            epoch=epoch,
            optimizer=optimizer.state_dict(),
            schedule=schedule.state(),
            history=history,
            best_auc=best[self.config.select_metric],
            best_epoch=best_epoch,
            config=to_dict(self.config),
        )
        write_csv(self.out / "history.csv", history)
        title = f"{self.config.name}: {self.config.model.name}"
        plot(self.out / "history.png", history, title, best_epoch)

    def _load_resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, options: dict[str, Any]
    ) -> dict[str, Any]:
        assert self.resume is not None
        state = read_checkpoint(self.resume)
        info = state["info"]
        if info["name"] != self.config.model.name or info["options"] != options:
            raise ConfigError(
                f"{self.resume}: checkpoint holds {info['name']} {info['options']}, but the "
                f"config trains {self.config.model.name} {options}"
            )
        if "optimizer" not in state:
            raise ConfigError(
                f"{self.resume}: no optimizer state to resume from; resume from the run's last.pt"
            )
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        return state
