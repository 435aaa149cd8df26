"""Per-epoch training history: metrics, a CSV beside the model, and a PNG of the curves."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from covid_cxr.fileio import atomic_open, atomic_path
from covid_cxr.numeric import sigmoid


@dataclass(frozen=True)
class Panel:
    """One plot of history.png: `train_<key>` and `val_<key>` against epoch, plus `extra`
    (history column, legend label) pairs drawn dashed."""

    key: str
    title: str
    extra: tuple[tuple[str, str], ...] = ()


def binary_metrics(
    targets: np.ndarray,
    logits: np.ndarray,
    loss: float,
    weights: np.ndarray | None = None,
    threshold: float = 0.5,
    balanced: np.ndarray | None = None,
) -> dict[str, float]:
    """Loss, accuracy at `threshold` and ROC AUC (nan when only one class is present).

    `weights` per image (e.g. 1 / size of its (source, class) group) make every group count
    equally: the AUC then averages COVID-19-vs-other comparisons over all pairs of groups,
    including the hard same-source ones that a source shortcut cannot win. `balanced`: such
    weights for an extra "auc_balanced" next to the plain figures, from the same probabilities.
    """
    probs = sigmoid(logits)
    correct = (probs >= threshold) == (targets >= 0.5)
    acc = float(np.average(correct, weights=weights)) if len(targets) else math.nan
    two_classes = len(np.unique(targets)) == 2

    def auc(sample_weight: np.ndarray | None) -> float:
        if not two_classes:
            return math.nan
        return float(roc_auc_score(targets, probs, sample_weight=sample_weight))

    metrics = {"loss": float(loss), "acc": acc, "auc": auc(weights)}
    if balanced is not None:
        metrics["auc_balanced"] = auc(balanced)
    return metrics


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def plot(
    path: Path,
    rows: list[dict[str, Any]],
    title: str,
    best_epoch: int,
    panels: tuple[Panel, ...],
) -> None:
    """Each panel's metric against epoch, train and validation, with the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8), constrained_layout=True)
    for ax, panel in zip(np.atleast_1d(axes), panels, strict=True):
        ax.plot(epochs, [r[f"train_{panel.key}"] for r in rows], "o-", label="train", ms=3)
        ax.plot(epochs, [r[f"val_{panel.key}"] for r in rows], "o-", label="validation", ms=3)
        for column, label in panel.extra:
            ax.plot(epochs, [r[column] for r in rows], "--", label=label, lw=1)
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"kept (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[-1].legend(frameon=False, fontsize=8)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
