"""The evaluation figures, as PNG files.

matplotlib's object API (`Figure` + Agg canvas) rather than pyplot: no global figure state, no
GUI backend, safe to call from any thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.evaluation.result import Confusion, ReliabilityBin

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]  # name -> (targets, probabilities)
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    # Below the axes; the tight bounding box grows to include it.
    fig.text(0.99, -0.01, RESEARCH_NOTICE, ha="right", va="top", fontsize=7, color="0.4")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.size) and 0 < int(y.sum()) < y.size


def _one_class_note(ax: Axes) -> None:
    ax.text(0.5, 0.5, "undefined: the data holds one class only", ha="center", va="center")


def _legend(ax: Axes, loc: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc, fontsize=8)


def _point(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(false-positive rate, sensitivity, precision) at a threshold."""
    pred = p >= threshold
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    return fp / max(int((y == 0).sum()), 1), tp / max(int(y.sum()), 1), precision


def roc_figure(curves: Curves, points: Mapping[str, float], path: Path) -> Path:
    """ROC curves (first = all images, the rest per source) with the operating points marked."""
    fig = _figure(6.0, 5.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
    for i, (name, (y, p)) in enumerate(curves.items()):
        if not _both_classes(y):
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2.2 if i == 0 else 1.2, alpha=1.0 if i == 0 else 0.8, label=name)
    y, p = next(iter(curves.values()))
    if not _both_classes(y):
        _one_class_note(ax)
    else:
        for marker, (op, threshold) in zip(MARKERS, points.items(), strict=False):
            fpr, tpr, _ = _point(y, p, threshold)
            ax.plot(fpr, tpr, marker, ms=9, mfc="none", mew=2, label=f"{op} (t={threshold:.3g})")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity", title="ROC")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    _legend(ax, "lower right")
    return _save(fig, path)


def pr_figure(curves: Curves, points: Mapping[str, float], path: Path) -> Path:
    """Precision-recall curves with the operating points; dotted: the prevalence baseline."""
    fig = _figure(6.0, 5.6)
    ax = fig.add_subplot()
    for i, (name, (y, p)) in enumerate(curves.items()):
        if not _both_classes(y):
            continue
        precision, recall, _ = precision_recall_curve(y, p)
        ax.step(recall, precision, where="post", lw=2.2 if i == 0 else 1.2, label=name)
    y, p = next(iter(curves.values()))
    if not _both_classes(y):
        _one_class_note(ax)
    else:
        ax.axhline(y.mean(), ls=":", color="0.6", lw=1, label=f"prevalence {y.mean():.2f}")
        for marker, (op, threshold) in zip(MARKERS, points.items(), strict=False):
            _, recall, precision = _point(y, p, threshold)
            ax.plot(recall, precision, marker, ms=9, mfc="none", mew=2, label=op)
    ax.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title="Precision-recall")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    _legend(ax, "lower left")
    return _save(fig, path)


def reliability_figure(table: Sequence[ReliabilityBin], ece: float | None, path: Path) -> Path:
    """Observed COVID-19 rate against mean predicted probability per bin, with bin counts."""
    fig = _figure(6.0, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="perfect calibration")
    filled = [row for row in table if row.count]
    top.plot(
        [row.mean_probability for row in filled],
        [row.fraction_covid for row in filled],
        "o-",
        lw=2,
        label="model" + (f" (ECE {ece:.3f})" if ece is not None else ""),
    )
    top.set(ylabel="observed COVID-19 fraction", title="Reliability (10 equal-width bins)")
    top.set(xlim=(0, 1), ylim=(-0.01, 1.01))
    top.legend(loc="upper left", fontsize=8)
    centres = [(row.lower + row.upper) / 2 for row in table]
    bottom.bar(centres, [row.count for row in table], width=0.09, color="0.5")
    bottom.set(xlabel="predicted probability", ylabel="images")
    return _save(fig, path)


def confusion_figure(
    confusion: Confusion, operating_point: str, threshold: float, path: Path
) -> Path:
    """The 2x2 table as an image, counts and row percentages."""
    cells = np.array([[confusion.tn, confusion.fp], [confusion.fn, confusion.tp]])
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.imshow(cells, cmap="Blues")
    totals = cells.sum(axis=1, keepdims=True)
    share = np.divide(cells, totals, out=np.zeros(cells.shape), where=totals > 0)
    for (r, c), count in np.ndenumerate(cells):
        dark = count > cells.max() / 2
        ax.text(
            c,
            r,
            f"{count}\n{share[r, c]:.0%}",
            ha="center",
            va="center",
            fontsize=13,
            color="white" if dark else "black",
        )
    labels = ["non-COVID", "COVID-19"]
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set(xlabel="predicted", ylabel="true", title=f"{operating_point} (t={threshold:.3g})")
    return _save(fig, path)


def errors_figure(panels: Sequence[tuple[np.ndarray, str]], title: str, path: Path) -> Path:
    """A grid of radiographs (RGB, heat map overlaid where available) with captions."""
    cols = min(4, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = _figure(3.2 * cols, 3.5 * rows + 0.4)
    fig.suptitle(title, fontsize=11)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < len(panels):
            image, caption = panels[i]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(caption, fontsize=8)
    return _save(fig, path)
