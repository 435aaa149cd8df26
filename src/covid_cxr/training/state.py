"""What a training run has learnt about itself so far: history, best epoch, patience, schedule.

Saved in last.pt (as top-level keys, beside the weights and optimizer state) and restored by
`--resume`, so a resumed run continues exactly where the uninterrupted one would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from covid_cxr.training.schedule import Schedule


@dataclass
class TrainState:
    """Loop state between epochs. `schedule` is the live learning-rate schedule; only its
    changing part (the plateau state) is saved."""

    schedule: Schedule
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    stale: int = 0  # epochs since the best one

    @property
    def epoch(self) -> int:
        """Epochs done (0 before the first)."""
        return self.history[-1]["epoch"] if self.history else 0

    @property
    def best(self) -> dict[str, Any] | None:
        """The history row of the best epoch so far."""
        return next((r for r in self.history if r["epoch"] == self.best_epoch), None)

    def record(self, row: dict[str, Any], score: float) -> bool:
        """Add an epoch's history row and its selection score; whether it is the new best."""
        self.history.append(row)
        self.schedule.observe(score)
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.stale = score, row["epoch"], 0
        else:
            self.stale += 1
        return improved

    def to_checkpoint(self) -> dict[str, Any]:
        """Keys for last.pt."""
        return {
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "stale": self.stale,
            "schedule": self.schedule.state(),
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any], schedule: Schedule) -> TrainState:
        """Restore from last.pt; files from before TrainState stored the score as "best_auc"
        and no patience counter (it is recomputed from the history)."""
        schedule.restore(data.get("schedule", {}))
        history = list(data["history"])
        best_epoch = int(data["best_epoch"])
        stale = data.get("stale", history[-1]["epoch"] - best_epoch if history else 0)
        return cls(
            schedule=schedule,
            history=history,
            best_epoch=best_epoch,
            best_score=float(data["best_score"] if "best_score" in data else data["best_auc"]),
            stale=int(stale),
        )
