"""Per-epoch training history: metrics, a CSV beside the model, and a PNG of the curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from covid_cxr.inference.runtime import sigmoid

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


def binary_metrics(
    targets: np.ndarray,
    logits: np.ndarray,
    loss: float,
    weights: np.ndarray | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Loss, accuracy at `threshold` and ROC AUC (nan when only one class is present).

    `weights` per image (e.g. 1 / size of its (source, class) group) make every group count
    equally: the AUC then averages COVID-19-vs-other comparisons over all pairs of groups,
    including the hard same-source ones that a source shortcut cannot win.
    """
    probs = sigmoid(logits)
    correct = (probs >= threshold) == (targets >= 0.5)
    acc = float(np.average(correct, weights=weights)) if len(targets) else math.nan
    two_classes = len(np.unique(targets)) == 2
    auc = roc_auc_score(targets, probs, sample_weight=weights) if two_classes else math.nan
    return {"loss": float(loss), "acc": acc, "auc": float(auc)}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def plot(path: Path, rows: list[dict[str, Any]], title: str, best_epoch: int) -> None:
    """Loss, accuracy and AUC against epoch, train and validation, with the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, key, label in zip(
        axes, ("loss", "acc", "auc"), ("loss", "accuracy", "ROC AUC"), strict=True
    ):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="train", ms=3)
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "o-", label="validation", ms=3)
        if key == "auc":
            balanced = [r["val_auc_balanced"] for r in rows]
            ax.plot(epochs, balanced, "--", label="validation, groups balanced", lw=1)
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"kept (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[2].legend(frameon=False, fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
