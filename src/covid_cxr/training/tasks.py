"""What is learned, apart from how: one `Task` per kind of model, one training loop for all.

The loop (covid_cxr.training.trainer) owns everything every task shares: processes and
devices, the model from the model registry (`[model] name`), the optimizer and learning-rate
schedule, batch order and sampling, bf16/channels-last steps, early stopping, resuming and
the run folder. A task owns the rest, listed in `Task` below: its cached train/val data, the
batch -> (inputs, targets) step with augmentation, the loss, the metrics (the one that picks
best.pt among them), the history columns and plots, and what its checkpoints record.

How to add a task (e.g. "segmentation"):

1. Write `covid_cxr/training/<task>.py` with a class implementing every member of `Task`.
   Its data splits implement `covid_cxr.training.dataset.Split` (`__len__`, `batch(index)`
   -> float32 (inputs, targets), `sources`, `summary()`, `unreadable`); decode each split
   once under `distributed.shard` and join the shares with `distributed.gather`, as
   `classification.build_cache` does, so torchrun's processes split the decoding.
   Augment with `covid_cxr.training.augment.augment_batch(images, config.augment, generator,
   masks=...)` so a mask gets exactly its image's geometric transform. The model comes from
   the model registry (covid_cxr.models); its outputs are whatever the task's loss and
   metrics expect (classification: (N,) logits; a segmenter: (N, 1, S, S) logits).
2. Register a factory taking the whole TrainConfig: `@register("<task>")` above the class
   (or a function returning an instance).
3. Import the module in `_load_builtin()` below (that runs its `@register`).
4. A config selects it with `task = "<task>"`; checkpoints record it as
   `info.metadata["task"]` (files without it are "classification").

Metrics are floats keyed without a prefix ("loss", "dice"); the loop prefixes "train_" /
"val_" and adds them to the epoch's history row (a dict: kept in last.pt, written to
history.csv in the order of `columns`). `select_metric` names one of the "val_" columns;
higher is better: it picks best.pt and drives early stopping and the plateau schedule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from covid_cxr.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from covid_cxr.config import TrainConfig
    from covid_cxr.training.dataset import Split
    from covid_cxr.training.distributed import Context
    from covid_cxr.training.history import Panel
    from covid_cxr.training.steps import LossFunction

DEFAULT_TASK = "classification"
"""The task of checkpoints and configs that do not name one (all made before tasks existed)."""


@dataclass
class TaskData:
    """A task's cached train and validation splits."""

    train: Split
    val: Split


class Task(Protocol):
    """One kind of model the loop can train. Built from the TrainConfig by its factory."""

    name: ClassVar[str]
    """Registry name; recorded in every checkpoint as `metadata["task"]`."""

    select_metric: str
    """History column (a "val_" one, higher is better) that picks best.pt."""

    columns: tuple[str, ...]
    """history.csv columns, in order (the loop adds "epoch", "lr", "images_per_s", "seconds"
    to every row; list them where they belong)."""

    panels: tuple[Panel, ...]
    """history.png: one plot per panel."""

    def load(self, context: Context, progress: bool) -> TaskData:
        """Read and cache the train and val splits; raise DataError/ConfigError on data the
        task cannot train or select on. Under torchrun every process returns the whole split."""
        ...

    def sample_weights(self, train: Split) -> torch.Tensor | None:
        """Per-image draw weights for the epoch sampler (None: a plain shuffle)."""
        ...

    def loss_function(self, train: Split) -> LossFunction:
        """(float32 outputs, targets on the outputs' device) -> scalar loss tensor."""
        ...

    def augment(
        self, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch as drawn from `train.batch` -> what the model trains on."""
        ...

    def keep(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What of a batch's (float32 outputs, targets) the epoch metrics need; gathered from
        every process, so a task with large outputs (masks) reduces them here. Keep the first
        dimension (one entry per image): the loop counts images by it."""
        ...

    def train_metrics(
        self, outputs: np.ndarray, targets: np.ndarray, loss: float
    ) -> dict[str, float]:
        """Metrics of an epoch's kept training outputs (`loss`: the mean training loss);
        keys without the "train_" prefix."""
        ...

    def val_metrics(self, outputs: np.ndarray, targets: np.ndarray, val: Split) -> dict[str, float]:
        """Metrics of the whole validation split (kept outputs in split order), including the
        loss and the selection metric; keys without the "val_" prefix."""
        ...

    def describe(self, row: dict[str, Any]) -> str:
        """One epoch's metrics for the log line."""
        ...

    def metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint saved after this epoch records in `ModelInfo.metadata`, beyond
        what the loop records (task, epoch, config name, manifest, sources, date)."""
        ...

    def result(self, best: dict[str, Any] | None) -> dict[str, float | None]:
        """The figures of the kept epoch's history row that metrics.json reports (None for
        each when no epoch was kept)."""
        ...

    def log_setup(self) -> str:
        """One line for the log: the task's augmentation, sampling, loss."""
        ...


TaskFactory = Callable[["TrainConfig"], Task]

_REGISTRY: dict[str, TaskFactory] = {}


def register(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator: make `factory(config) -> Task` available as `task = "<name>"`."""

    def decorator(factory: TaskFactory) -> TaskFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            warnings.warn(f"task {name!r} registered twice; the later one wins", stacklevel=2)
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from covid_cxr.training import classification  # noqa: F401


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create(config: TrainConfig) -> Task:
    """The task `config.task` names, built from `config`; unknown names are refused."""
    _load_builtin()
    if config.task not in _REGISTRY:
        raise ConfigError(
            f"unknown task {config.task!r} in training config {config.name!r}; "
            f"available: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[config.task](config)
