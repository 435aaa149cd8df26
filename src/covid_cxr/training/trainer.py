"""`covid-cxr train`: fit a model from a config and leave a self-describing run folder.

The loop is the same for every task (covid_cxr.training.tasks: what is learnt, from which
data, with which loss and metrics); the run folder is covid_cxr.training.run_folder.

The same command runs under `torchrun` (DistributedDataParallel; `batch_size` is the global
batch, split over the processes); only the main process logs and writes files. Naming: `net`
is the model itself (what is saved), `wrapped` is what trains (compiled and/or DDP-wrapped).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from covid_cxr.config import TrainConfig
from covid_cxr.errors import ConfigError
from covid_cxr.models import accepts, create
from covid_cxr.models.checkpoint import read_checkpoint
from covid_cxr.training import distributed, tasks
from covid_cxr.training.cpu import configure_cpu
from covid_cxr.training.dataset import EpochSampler, Split
from covid_cxr.training.run_folder import RunFolder, RunResult
from covid_cxr.training.schedule import Schedule, make_optimizer
from covid_cxr.training.state import TrainState
from covid_cxr.training.steps import LossFunction, predict, seed_everything, train_step
from covid_cxr.training.tasks import TaskData


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_options(config: TrainConfig) -> dict[str, Any]:
    """The model's options as trained; the input size is filled in for models that need it."""
    options = {k: v for k, v in config.model.options.items() if k != "pretrained"}
    if accepts(config.model.name, "size"):
        options.setdefault("size", config.preprocess.size)
    return options


@dataclass
class Parts:
    """What one run trains with, built once by `Trainer._assemble`."""

    data: TaskData
    net: nn.Module  # the model itself: what is saved and validated
    wrapped: nn.Module  # what trains: `net` compiled and/or under DDP
    options: dict[str, Any]  # the model's options, as saved in checkpoints
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler
    loss_function: LossFunction
    folder: RunFolder | None  # None on every process but the main one


class Trainer:
    """One training run; `run()` returns what it writes to metrics.json."""

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
        self.task = tasks.create(config)

    def log(self, text: str) -> None:
        if self.context.main:
            self._log(text)

    def run(self) -> RunResult:
        self.context = distributed.setup(self.config.runtime.device)
        try:
            return self._run()
        finally:
            distributed.teardown(self.context)

    def _run(self) -> RunResult:
        started = time.perf_counter()
        self.train_seconds, self.train_images = 0.0, 0  # this session's epochs, for img/s
        self._setup_process()
        parts, state = self._assemble()
        stopped_early = False
        for epoch in range(state.epoch + 1, self.config.epochs + 1):
            self._train_epoch(parts, state, epoch)
            if self.config.patience and state.stale >= self.config.patience:
                stopped_early = True
                self.log(
                    f"early stop: no {self.task.select_metric} gain for {state.stale} epochs "
                    f"(best {state.best_epoch})"
                )
                break
        distributed.barrier(self.context)
        result = self._result(state, parts.data, stopped_early, started)
        if parts.folder:
            parts.folder.write_result(result)
            self.log(f"{result.describe()}; run folder {self.out}")
            for item in result.unreadable:
                self.log(f"  unreadable: {item.path}: {item.reason}")
        return result

    # -------------------------------------------------------- setup

    def _setup_process(self) -> None:
        config, context = self.config, self.context
        if context.device.type == "cpu":
            configure_cpu(config.runtime.threads, config.runtime.reuse_memory)
        seed_everything(config.seed)
        if config.batch_size % context.world:
            raise ConfigError(
                f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                f"{context.world} processes"
            )

    def _assemble(self) -> tuple[Parts, TrainState]:
        """Data, model, optimizer, sampler, loss and run folder; the state to start from."""
        config, context, task = self.config, self.context, self.task
        data = task.load(context, self.progress)
        self.log(f"train: {data.train.summary()}; sources {data.train.sources}")
        self.log(f"val:   {data.val.summary()}")
        net, options = self._build_model()
        optimizer = make_optimizer(net, config.optim)
        state = self._initial_state(net, optimizer, options)
        parts = Parts(
            data=data,
            net=net,
            wrapped=self._wrap(net),
            options=options,
            optimizer=optimizer,
            sampler=self._sampler(data.train),
            loss_function=task.loss_function(data.train),
            folder=RunFolder(self.out, config, task) if context.main else None,
        )
        if parts.folder:
            parts.folder.write_config()
        self.log(
            f"{task.name}: model {config.model.name} {options}, "
            f"{sum(p.numel() for p in net.parameters()):,} parameters, on {context.device} "
            f"x{context.world}; {task.log_setup()}"
        )
        return parts, state

    def _build_model(self) -> tuple[nn.Module, dict[str, Any]]:
        options = model_options(self.config)
        # A resumed run takes every weight from its checkpoint.
        pretrained = bool(self.config.model.options.get("pretrained")) and self.resume is None
        net = create(self.config.model.name, **options, pretrained=pretrained)
        net = net.to(self.context.device)
        if self.config.runtime.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net, options

    def _wrap(self, net: nn.Module) -> nn.Module:
        """What trains: the net, compiled and/or under DistributedDataParallel."""
        wrapped = torch.compile(net) if self.config.runtime.compile else net
        if self.context.distributed:
            device = self.context.device
            device_ids = [device.index] if device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
        return wrapped  # type: ignore[return-value]

    def _sampler(self, train: Split) -> EpochSampler:
        return EpochSampler(
            size=len(train),
            seed=self.config.seed,
            weights=self.task.sample_weights(train),
            epoch_size=self.config.sampling.epoch_size,
            rank=self.context.rank,
            world=self.context.world,
        )

    def _initial_state(
        self, net: nn.Module, optimizer: torch.optim.Optimizer, options: dict[str, Any]
    ) -> TrainState:
        """A fresh state, or the one saved in --resume's last.pt (weights and optimizer too)."""
        schedule = Schedule(self.config.optim, self.config.epochs)
        if self.resume is None:
            return TrainState(schedule)
        saved = read_checkpoint(self.resume)
        info = saved["info"]
        if info["name"] != self.config.model.name or info["options"] != options:
            raise ConfigError(
                f"{self.resume}: checkpoint holds {info['name']} {info['options']}, but the "
                f"config trains {self.config.model.name} {options}"
            )
        saved_task = info.get("metadata", {}).get("task", tasks.DEFAULT_TASK)
        if saved_task != self.task.name:
            raise ConfigError(
                f"{self.resume}: checkpoint was trained for task {saved_task!r}, but the "
                f"config trains {self.task.name!r}"
            )
        if "optimizer" not in saved:
            raise ConfigError(
                f"{self.resume}: no optimizer state to resume from; resume from the run's last.pt"
            )
        net.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState.from_checkpoint(saved, schedule)
        if state.epoch >= self.config.epochs:
            raise ConfigError(
                f"{self.resume} has already trained {state.epoch} epochs and the config "
                f"asks for {self.config.epochs}; raise --epochs to continue"
            )
        self.log(f"resuming {self.resume} after epoch {state.epoch}")
        return state

    # -------------------------------------------------------- one epoch

    def _train_epoch(self, parts: Parts, state: TrainState, epoch: int) -> None:
        """Train, validate, record, save and log one epoch."""
        row = self._fit(parts, state.schedule, epoch)
        row.update(self._validate(parts.net, parts.data.val))
        improved = state.record(row, row[self.task.select_metric])
        if parts.folder:
            parts.folder.save_epoch(parts.net, parts.options, parts.optimizer, state, improved)
        self.log(
            f"epoch {epoch}/{self.config.epochs}: {self.task.describe(row)}"
            f"{' *' if improved else ''} | {row['images_per_s']:.1f} img/s"
        )

    def _fit(self, parts: Parts, schedule: Schedule, epoch: int) -> dict[str, Any]:
        """Train one epoch; its history row with the task's training metrics."""
        config, context = self.config, self.context
        # Seeding per epoch makes a resumed run repeat the uninterrupted one.
        seed_everything(config.seed * 1000 + epoch + context.rank)
        augment_rng = torch.Generator().manual_seed(config.seed * 7919 + epoch * 31 + context.rank)
        batches = parts.sampler.batches(epoch, config.batch_size)
        parts.wrapped.train()
        outputs, targets, loss_sum, seen = [], [], 0.0, 0
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
            loss, out, y = self._step(parts, index, lr, augment_rng)
            outputs.append(out)
            targets.append(y)
            loss_sum += loss * len(index)
            seen += len(index)
            bar.update(len(index) * context.world)
            rate = bar.n / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{rate:.1f}", lr=f"{lr:.2g}")
        seconds = time.perf_counter() - start
        bar.close()
        out_np, y_np, losses = distributed.gather_arrays(
            context, torch.cat(outputs).numpy(), torch.cat(targets).numpy(), np.array([loss_sum])
        )
        self.train_seconds += seconds
        self.train_images += len(out_np)
        metrics = self.task.train_metrics(out_np, y_np, float(losses.sum()) / len(out_np))
        return {
            "epoch": epoch,
            "lr": schedule.lr(epoch - 1),
            **{f"train_{k}": v for k, v in metrics.items()},
            "images_per_s": len(out_np) / seconds,
            "seconds": seconds,
        }

    def _step(
        self, parts: Parts, index: torch.Tensor, lr: float, generator: torch.Generator
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimizer step on the images at `index`; the loss and the kept (outputs,
        targets), on the CPU."""
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = self.task.augment(*parts.data.train.batch(index), generator)
        loss, outputs = train_step(
            parts.wrapped,
            parts.optimizer,
            inputs,
            targets,
            parts.loss_function,
            self.context.device,
            bf16=self.config.runtime.bf16,
            channels_last=self.config.runtime.channels_last,
        )
        outputs, targets = self.task.keep(outputs, targets.to(outputs.device))
        return loss, outputs.cpu(), targets.cpu()

    def _validate(self, net: nn.Module, val: Split) -> dict[str, float]:
        runtime = self.config.runtime
        outputs, targets = predict(
            net,
            val,
            self.context,
            batch_size=runtime.eval_batch_size,
            bf16=runtime.bf16,
            channels_last=runtime.channels_last,
            keep=self.task.keep,
        )
        metrics = self.task.val_metrics(outputs, targets, val)
        return {f"val_{k}": v for k, v in metrics.items()}

    def _result(
        self, state: TrainState, data: TaskData, stopped_early: bool, started: float
    ) -> RunResult:
        config = self.config
        return RunResult(
            name=config.name,
            model=config.model.name,
            task=self.task.name,
            best_epoch=state.best_epoch,
            epochs_run=len(state.history),
            stopped_early=stopped_early,
            selected_on=self.task.select_metric,
            best=self.task.result(state.best),
            train_images_per_s=self.train_images / self.train_seconds
            if self.train_seconds
            else None,
            wall_seconds=time.perf_counter() - started,
            peak_rss_mib=peak_rss_mib(),
            device=str(self.context.device),
            processes=self.context.world,
            threads=torch.get_num_threads(),
            n_train=len(data.train),
            n_val=len(data.val),
            train_sources=data.train.sources,
            unreadable=data.train.unreadable + data.val.unreadable,
        )
