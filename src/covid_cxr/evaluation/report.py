"""The evaluation report (Markdown + HTML) written from the same `EvaluationResult` as
metrics.json, so the report can never show a number the JSON does not hold."""

from __future__ import annotations

from pathlib import Path

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.evaluation.document import Document, to_html, to_markdown
from covid_cxr.evaluation.metrics import SCORE_METRICS, THRESHOLD_METRICS
from covid_cxr.evaluation.result import DataSummary, EvaluationResult, ModelSummary, SubsetResult
from covid_cxr.fileio import atomic_write_text

LABELS = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity (COVID-19 recall)",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC (average precision)",
    "brier": "Brier score (lower is better)",
    "ece": "ECE, 10 equal-width bins (lower is better)",
}
LISTED_MAX = 200  # longer lists are in metrics.json only


def _tables(doc: Document, subset: SubsetResult) -> None:
    doc.table(
        ["metric", "value (95% CI)"],
        [[LABELS[name], str(subset.scores[name])] for name in SCORE_METRICS],
    )
    points = subset.operating_points
    doc.table(
        ["metric", *(f"{op} (t={p.threshold:.3g})" for op, p in points.items())],
        [
            [LABELS[name], *(str(p.metrics[name]) for p in points.values())]
            for name in THRESHOLD_METRICS
        ],
    )
    doc.table(
        ["operating point", "TP", "FP", "TN", "FN"],
        [
            [
                op,
                *(str(n) for n in (p.confusion.tp, p.confusion.fp, p.confusion.tn, p.confusion.fn)),
            ]
            for op, p in points.items()
        ],
    )


def _limited(rows: list[list[str]]) -> list[list[str]]:
    if len(rows) <= LISTED_MAX:
        return rows
    return [*rows[:LISTED_MAX], [f"... {len(rows) - LISTED_MAX} more in metrics.json", ""]]


def build(result: EvaluationResult, out: Path) -> Document:
    model, data = result.model, result.data
    doc = Document(f"Evaluation: {model.name} {model.version} on {Path(data.path).name}")
    doc.notice(RESEARCH_NOTICE)
    doc.paragraph(_summary(result))
    _model_section(doc, model)
    _data_section(doc, data)
    _operating_points_section(doc, result)
    figures = {name: out / file for name, file in result.figures.items()}
    _results_section(doc, result, figures)
    _attention_section(doc, result)
    _errors_section(doc, result, figures)
    _unusable_section(doc, data)
    _method_section(doc, result)
    doc.notice(RESEARCH_NOTICE)
    return doc


def _summary(result: EvaluationResult) -> str:
    data, overall, at = result.data, result.overall, result.at_primary
    return (
        f"{data.scored} of {data.listed} images scored ({overall.n_covid} COVID-19, "
        f"{overall.n_non_covid} non-COVID, {overall.n_clusters} patients); "
        f"{len(data.unreadable)} could not be read and {len(data.excluded_by_reader)} were "
        f"left out by the data reader (both listed below). Split: {data.split}. ROC-AUC "
        f"{overall.scores['roc_auc']}; at the model's operating point "
        f"'{result.primary_operating_point}' (t={at.threshold:.3g}) sensitivity "
        f"{at.metrics['sensitivity']}, specificity {at.metrics['specificity']}."
    )


def _model_section(doc: Document, model: ModelSummary) -> None:
    doc.heading("Model")
    doc.table(
        ["", ""],
        [
            ["file", model.path],
            ["runtime", model.runtime],
            ["architecture", f"{model.name} {model.options}"],
            ["version", model.version],
            ["preprocessing", str(model.preprocess)],
            ["thresholds stored in the model", str(model.thresholds)],
            ["operating point used by inference", model.operating_point],
        ],
    )


def _data_section(doc: Document, data: DataSummary) -> None:
    doc.heading("Data")
    doc.paragraph(f"{data.path} (split: {data.split}).")
    doc.table(
        ["source", "images", "COVID-19", "non-COVID", "patients"],
        [
            [name, *(str(n) for n in (s.images, s.covid, s.non_covid, s.patients))]
            for name, s in data.sources.items()
        ],
    )
    doc.table(["label", "images"], [[k, str(v)] for k, v in data.labels.items()])
    doc.bullets(list(data.notes))


def _operating_points_section(doc: Document, result: EvaluationResult) -> None:
    doc.heading("Operating points")
    doc.paragraph(
        "COVID-19 is predicted when the probability is at least the threshold. "
        + result.operating_points_origin
    )
    doc.table(
        ["operating point", "threshold", "chosen by"],
        [[op, f"{p.threshold:.4g}", p.origin] for op, p in result.operating_points.items()],
    )
    validation = result.validation
    if validation is None:
        return
    doc.paragraph(
        f"Validation data: {validation.scored} of {validation.listed} images scored "
        f"({validation.n_covid} COVID-19); {len(validation.unreadable)} unreadable "
        "(listed in metrics.json)."
    )
    if validation.overlap_with_evaluated:
        doc.notice(
            f"Warning: {validation.overlap_with_evaluated} validation image(s) are also in "
            "the evaluated data; the thresholds were tuned on part of the test data."
        )


def _results_section(doc: Document, result: EvaluationResult, figures: dict[str, Path]) -> None:
    doc.heading("Results: all images")
    _tables(doc, result.overall)
    for name, alt in (
        ("roc", "ROC curves"),
        ("pr", "Precision-recall curves"),
        ("reliability", "Reliability diagram"),
        ("confusion", "Confusion matrix"),
    ):
        if name in figures:
            doc.image(figures[name], alt)
    for source, subset in result.per_source.items():
        doc.heading(f"Source: {source}", 3)
        doc.paragraph(
            f"{subset.n} images ({subset.n_covid} COVID-19, {subset.n_non_covid} "
            f"non-COVID, {subset.n_clusters} patients)."
        )
        _tables(doc, subset)


def _attention_section(doc: Document, result: EvaluationResult) -> None:
    doc.heading("Where the model looks: Grad-CAM mass inside the lungs")
    doc.paragraph(result.cam_in_lungs_note)
    if result.cam_in_lungs:
        doc.table(
            ["images", "share inside the lungs (95% CI)"],
            [[name, str(share)] for name, share in result.cam_in_lungs.items()],
        )


def _errors_section(doc: Document, result: EvaluationResult, figures: dict[str, Path]) -> None:
    doc.heading("Most confident errors")
    if "errors" in figures:
        doc.paragraph(result.errors_note)
        doc.image(figures["errors"], "Most confident errors")
    doc.table(
        ["error", "probability", "label", "source", "file"],
        [[e.error, f"{e.probability:.3f}", e.label, e.source, e.path] for e in result.errors]
        or [["none", "", "", "", ""]],
    )


def _unusable_section(doc: Document, data: DataSummary) -> None:
    doc.heading("Images that could not be used")
    doc.paragraph(f"Unreadable at decoding or refused by the input gate: {len(data.unreadable)}.")
    if data.unreadable:
        doc.table(["file", "reason"], _limited([[u.path, u.reason] for u in data.unreadable]))
    doc.paragraph(f"Left out by the data reader: {len(data.excluded_by_reader)}.")
    if data.excluded_by_reader:
        doc.table(
            ["item", "kind", "reason"],
            _limited([[x.item, x.kind, x.reason] for x in data.excluded_by_reader]),
        )


def _method_section(doc: Document, result: EvaluationResult) -> None:
    boot = result.method.bootstrap
    doc.heading("Method")
    doc.bullets(
        [
            f"95% confidence intervals: percentile bootstrap, {boot.resamples} resamples "
            f"(seed {boot.seed}) of {boot.unit}. Metrics at an operating point hold its "
            "threshold fixed.",
            f"Calibration: {result.method.calibration}.",
            "An undefined metric (e.g. specificity without non-COVID images, AUC with one "
            "class) is reported as n/a with the reason.",
            "Binary task: COVID-19 against every other label (normal, pneumonia, ...).",
        ]
    )


def write_reports(result: EvaluationResult, out: Path) -> tuple[Path, Path]:
    doc = build(result, out)
    markdown = atomic_write_text(out / "report.md", to_markdown(doc, out))
    page = atomic_write_text(out / "report.html", to_html(doc))
    return markdown, page
