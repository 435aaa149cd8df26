"""The optimizer and its learning rate per step: warmup, then none/cosine/step/plateau."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from covid_cxr.config import OptimConfig

PLATEAU_FIELDS = ("plateau_scale", "plateau_best", "plateau_bad")


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
        """The epoch's model-selection score drives the plateau schedule."""
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
        """The part that changes while training (what a resumed run must restore)."""
        return {k: getattr(self, k) for k in PLATEAU_FIELDS}

    def restore(self, state: dict[str, float]) -> None:
        for key in PLATEAU_FIELDS:
            if key in state:
                setattr(self, key, state[key])


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(
        params, lr=optim.lr, momentum=0.9, nesterov=True, weight_decay=optim.weight_decay
    )
