"""The run folder a training run leaves behind, and what its files hold.

runs/<name>/ (or --out): config.toml (the resolved config), history.csv / history.png (the
task's metrics per epoch, train and validation), best.pt (the epoch with the best selection
metric, what evaluation and export use), last.pt (for --resume) and metrics.json (`RunResult`).
Every file is written atomically, so an interrupted run never leaves a truncated one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covid_cxr.config import TrainConfig, dump_toml, to_dict
from covid_cxr.fileio import atomic_write_text
from covid_cxr.models.checkpoint import ModelInfo, save_checkpoint
from covid_cxr.training.dataset import Unreadable
from covid_cxr.training.history import plot, write_csv
from covid_cxr.training.state import TrainState
from covid_cxr.training.tasks import Task


@dataclasses.dataclass
class RunResult:
    """What metrics.json holds: the kept epoch's figures and how the run went."""

    name: str
    model: str
    task: str
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    selected_on: str
    best: dict[str, float | None]  # the task's figures of the kept epoch (e.g. val_auc)
    train_images_per_s: float | None
    wall_seconds: float
    peak_rss_mib: float
    device: str
    processes: int
    threads: int
    n_train: int
    n_val: int
    train_sources: list[str]
    unreadable: list[Unreadable]

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout: the kept epoch's figures at the top level, after how it was kept."""
        data = dataclasses.asdict(self)
        layout: dict[str, Any] = {}
        for key, value in data.items():
            layout.update(value if key == "best" else {key: value})
        return layout

    def describe(self) -> str:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in self.best.items() if v is not None)
        speed = f"{self.train_images_per_s:.1f} img/s, " if self.train_images_per_s else ""
        return (
            f"best epoch {self.best_epoch}: {figures}; {speed}peak RSS {self.peak_rss_mib:.0f} MiB"
        )


def weights_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:8]


def checkpoint_info(
    config: TrainConfig, task: Task, net: nn.Module, options: dict[str, Any], row: dict[str, Any]
) -> ModelInfo:
    """The ModelInfo saved with the weights after the epoch of history row `row`."""
    now = datetime.now(UTC)
    return ModelInfo(
        name=config.model.name,
        options=options,
        preprocess=config.preprocess,
        version=f"{config.name}-{now.strftime('%Y%m%d')}-{weights_hash(net)}",
        metadata={
            "task": task.name,
            "train_config": config.name,
            "manifest": str(config.manifest),
            "epoch": row["epoch"],
            "trained_at": now.isoformat(timespec="seconds"),
            "train_sources": sorted(set(config.sampling.train_sources)) or "all but excluded",
            "exclude_sources": list(config.sampling.exclude_sources),
            **task.metadata(row),
        },
    )


class RunFolder:
    """Writes one run's files (only the main process makes one)."""

    def __init__(self, path: Path, config: TrainConfig, task: Task) -> None:
        self.path = Path(path)
        self.config = config
        self.task = task

    def write_config(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.toml", dump_toml(to_dict(self.config)))

    def save_epoch(
        self,
        net: nn.Module,
        options: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        improved: bool,
    ) -> None:
        """best.pt when the epoch is the best so far, last.pt (weights, optimizer, TrainState,
        config: all --resume needs) and the history, after every epoch."""
        info = checkpoint_info(self.config, self.task, net, options, state.history[-1])
        if improved:
            save_checkpoint(self.path / "best.pt", net, info, epoch=state.epoch)
        save_checkpoint(
            self.path / "last.pt",
            net,
            info,
            epoch=state.epoch,
            optimizer=optimizer.state_dict(),
            config=to_dict(self.config),
            **state.to_checkpoint(),
        )
        write_csv(self.path / "history.csv", state.history, self.task.columns)
        title = f"{self.config.name}: {self.config.model.name}"
        plot(self.path / "history.png", state.history, title, state.best_epoch, self.task.panels)

    def write_result(self, result: RunResult) -> None:
        atomic_write_text(self.path / "metrics.json", json.dumps(result.to_dict(), indent=2))
