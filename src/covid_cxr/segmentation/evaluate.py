"""Dice of a lung segmenter on held-out patients, per source, with patient-bootstrap CIs.

Each image is segmented as a user gets it (`LungSegmenter.segment`: the radiograph's own size,
post-processed) and compared with its published mask at that size. Means per source come with
95% percentile intervals from resampling whole patients (`covid_cxr.evaluation.bootstrap`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.data.masks import CONVENTIONS, MaskRecord, load_mask_manifest, read_mask
from covid_cxr.errors import DataError, failure_reason
from covid_cxr.evaluation.bootstrap import cluster_ids, percentile_ci, resample_weights
from covid_cxr.evaluation.document import Document, to_html, to_markdown
from covid_cxr.fileio import atomic_path, atomic_write_text
from covid_cxr.imaging import read_radiograph
from covid_cxr.inference.batch import map_ordered
from covid_cxr.segmentation.masks import dice
from covid_cxr.segmentation.segmenter import LungSegmenter

# Goals set for the shipped segmenter (issue #9): mean Dice per source.
GOALS = {"jsrt": 0.95, "openist": 0.95, "ieee8023": 0.92}
ALL = "all"


@dataclass(frozen=True)
class ImageDice:
    image: str
    source: str
    patient_id: str
    dice: float
    area_fraction: float  # predicted lung share of the image
    truth_fraction: float  # published mask's lung share
    components: int


@dataclass(frozen=True)
class DiceSummary:
    """Mean Dice of one source (or "all") with its 95% CI, the spread of the images, and the
    mean ratio of predicted to published lung area (below 1: the model draws less lung than
    the annotators, e.g. leaves out the lung behind the heart that V7 Labs masks include)."""

    source: str
    n: int
    patients: int
    mean: float
    ci_low: float
    ci_high: float
    median: float
    p05: float
    minimum: float
    area_ratio: float
    goal: float | None


@dataclass
class SegmentationEvaluation:
    model: str
    version: str
    data: str
    split: str
    images: list[ImageDice]
    summaries: list[DiceSummary]
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    preprocess: dict[str, object] = field(default_factory=dict)


def summarise(images: list[ImageDice], source: str, resamples: int, seed: int = 0) -> DiceSummary:
    chosen = [i for i in images if source in (ALL, i.source)]
    values = np.array([i.dice for i in chosen], dtype=np.float64)
    clusters = cluster_ids([i.patient_id for i in chosen], [i.source for i in chosen])
    weights = resample_weights(clusters, resamples, seed).astype(np.float64)
    means = (weights @ values) / np.maximum(weights.sum(1), 1e-12)
    low, high = percentile_ci(means) or (float("nan"), float("nan"))
    return DiceSummary(
        source=source,
        n=len(chosen),
        patients=len(set(clusters.tolist())),
        mean=float(values.mean()),
        ci_low=low,
        ci_high=high,
        median=float(np.median(values)),
        p05=float(np.percentile(values, 5)),
        minimum=float(values.min()),
        area_ratio=float(np.mean([i.area_fraction / max(i.truth_fraction, 1e-9) for i in chosen])),
        goal=GOALS.get(source),
    )


def evaluate_segmenter(
    model: str | Path | None,
    manifest: Path,
    *,
    split: str = "test",
    workers: int = 2,
    resamples: int = 2000,
) -> SegmentationEvaluation:
    segmenter = LungSegmenter(model, threads=1)
    records = [r for r in load_mask_manifest(manifest) if r.split == split]
    if not records:
        raise DataError(f"{manifest}: no rows in split {split!r}")

    def work(record: MaskRecord) -> ImageDice:
        radiograph = read_radiograph(record.image)
        truth = read_mask(record.mask)
        lungs = segmenter.segment(radiograph)
        return ImageDice(
            str(record.image),
            record.source,
            record.patient_id,
            dice(lungs.mask, truth),
            lungs.area_fraction,
            float(truth.mean()),
            lungs.components,
        )

    start = time.perf_counter()
    images, failures = [], []
    for record, result in map_ordered(work, records, workers=workers, ahead=4 * workers):
        if isinstance(result, BaseException):
            failures.append((str(record.image), failure_reason(result)))
        else:
            images.append(result)
    if not images:
        raise DataError(f"{manifest}: none of the {len(records)} {split} images could be scored")
    sources = sorted({i.source for i in images})
    return SegmentationEvaluation(
        model=str(segmenter.path),
        version=segmenter.info.version,
        data=str(manifest),
        split=split,
        images=images,
        summaries=[summarise(images, s, resamples) for s in [*sources, ALL]],
        failures=failures,
        seconds=time.perf_counter() - start,
        preprocess=segmenter.info.preprocess.to_dict(),
    )


def _plot(evaluation: SegmentationEvaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [s.source for s in evaluation.summaries if s.source != ALL]
    values = [[i.dice for i in evaluation.images if i.source == s] for s in sources]
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    ax.boxplot(values, showfliers=False)
    ax.set_xticks(range(1, len(sources) + 1), sources)
    for k, v in enumerate(values, start=1):
        jitter = np.random.default_rng(k).uniform(-0.12, 0.12, len(v))
        ax.plot(k + jitter, v, "o", ms=3, alpha=0.5)
    for k, s in enumerate(sources, start=1):
        if s in GOALS:
            ax.hlines(GOALS[s], k - 0.4, k + 0.4, colors="red", linestyles=":", lw=1)
    ax.set_ylabel("Dice per image")
    ax.set_title(f"Lung segmentation, {evaluation.split} split (red: goal)")
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _document(evaluation: SegmentationEvaluation, figure: Path) -> Document:
    doc = Document("Lung segmenter: Dice on held-out patients")
    doc.notice(RESEARCH_NOTICE)
    doc.paragraph(
        f"Model `{Path(evaluation.model).name}` (version {evaluation.version}, preprocessing "
        f"{evaluation.preprocess}); data `{evaluation.data}`, split `{evaluation.split}`: "
        f"{len(evaluation.images)} radiographs scored in {evaluation.seconds:.0f} s. Dice per "
        "image "
        "at the radiograph's own size, after post-processing (two largest components, holes "
        "filled); means with 95% bootstrap intervals resampling patients."
    )
    doc.heading("Dice per source")
    rows = []
    for s in evaluation.summaries:
        goal = (
            "" if s.goal is None else f">= {s.goal:.2f}: {'met' if s.mean >= s.goal else 'NOT met'}"
        )
        rows.append(
            [
                s.source,
                CONVENTIONS.get(s.source, "mixed"),
                str(s.n),
                str(s.patients),
                f"{s.mean:.4f} ({s.ci_low:.4f}-{s.ci_high:.4f})",
                f"{s.median:.4f}",
                f"{s.p05:.4f}",
                f"{s.minimum:.4f}",
                f"{s.area_ratio:.3f}",
                goal,
            ]
        )
    header = ["source", "mask convention", "images", "patients", "mean Dice (95% CI)"]
    doc.table([*header, "median", "5th pct", "min", "area ratio", "goal"], rows)
    doc.paragraph(
        "Area ratio: mean of predicted / published lung area per image (below 1: the model "
        "draws less lung than the annotators)."
    )
    doc.image(figure, "Dice per image and source")
    doc.heading("Lowest Dice")
    worst = sorted(evaluation.images, key=lambda i: i.dice)[:10]
    doc.table(
        ["image", "source", "Dice", "lung area", "components"],
        [
            [
                Path(i.image).name,
                i.source,
                f"{i.dice:.4f}",
                f"{i.area_fraction:.1%}",
                str(i.components),
            ]
            for i in worst
        ],
    )
    if evaluation.failures:
        doc.heading("Not scored")
        doc.bullets([f"{image}: {reason}" for image, reason in evaluation.failures])
    return doc


def write_report(evaluation: SegmentationEvaluation, out: Path) -> tuple[Path, Path, Path]:
    """report.md, report.html, metrics.json and dice.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "dice.png"
    _plot(evaluation, figure)
    doc = _document(evaluation, figure)
    markdown = atomic_write_text(out / "report.md", to_markdown(doc, out))
    html = atomic_write_text(out / "report.html", to_html(doc))
    metrics = {
        "model": Path(evaluation.model).name,
        "version": evaluation.version,
        "data": evaluation.data,
        "split": evaluation.split,
        "seconds": evaluation.seconds,
        "preprocess": evaluation.preprocess,
        "summaries": [asdict(s) for s in evaluation.summaries],
        "failures": [{"image": i, "reason": r} for i, r in evaluation.failures],
    }
    data = atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return markdown, html, data
