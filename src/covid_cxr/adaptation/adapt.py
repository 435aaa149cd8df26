"""`covid-cxr adapt` end to end: read the site's labelled radiographs, extract the base model's
frozen features, decide by cross-validation by patient (`site.fit_site`), and write an ordinary
model file whose ModelInfo records the site, the counts and the cross-validated figures.

When the refit does not beat the base model in cross-validation, the base head is kept and the
written model differs from the base only in its site thresholds and metadata: a head that did
not prove itself on the site's own labels is not worth the risk of having learnt their noise.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr.adaptation.features import LocalFeatures, extract_features, onnx_runtime
from covid_cxr.adaptation.head import LinearHead
from covid_cxr.adaptation.onnx_model import write_adapted
from covid_cxr.adaptation.site import SiteFit, fit_site, parse_operating_point
from covid_cxr.data.manifest import load_labelled
from covid_cxr.data.sources import Exclusion
from covid_cxr.errors import DataError, ModelError
from covid_cxr.evaluation.bootstrap import cluster_ids
from covid_cxr.inference.batch import Failure
from covid_cxr.inference.metadata import parse_metadata
from covid_cxr.inference.predictor import Predictor
from covid_cxr.models.info import ModelInfo

MIN_PER_CLASS = 10
MIN_PATIENTS_PER_CLASS = 3


@dataclass
class AdaptOptions:
    data: Path
    out: Path
    model: str | Path | None = None
    site: str | None = None  # default: the name of the data folder or CSV
    operating_point: str = "youden"
    method: str = "logistic"
    repeats: int = 5
    resamples: int = 1000
    seed: int = 0
    workers: int = 2
    threads: int | None = 2


@dataclass
class AdaptResult:
    out: Path
    site: str
    counts: dict[str, int]
    fit: SiteFit
    info: ModelInfo
    failures: list[Failure] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    seconds: float = 0.0


def check_counts(y: np.ndarray, clusters: np.ndarray, where: str) -> None:
    """Refuse local data too small to adapt to or to measure on, saying what to add."""
    covid, other = int(y.sum()), int(y.size - y.sum())
    if min(covid, other) < MIN_PER_CLASS:
        raise DataError(
            f"{where}: {covid} COVID-19 and {other} non-COVID radiographs; adapt needs at least "
            f"{MIN_PER_CLASS} of each class (about 50 of each is better) to fit and to measure "
            "anything. Label more of your site's radiographs, then run adapt again"
        )
    patients = [np.unique(clusters[y == label]).size for label in (1, 0)]
    if min(patients) < MIN_PATIENTS_PER_CLASS:
        raise DataError(
            f"{where}: the radiographs come from {patients[0]} COVID-19 and {patients[1]} "
            f"non-COVID patients; cross-validation by patient needs at least "
            f"{MIN_PATIENTS_PER_CLASS} patients per class. Add radiographs of other patients"
        )


def _after_failures(data: Path, failures: list[Failure], shown: int = 3) -> str:
    """`data`, naming the files that could not be used (they count against the minimum)."""
    if not failures:
        return str(data)
    listed = "; ".join(f"{f.source}: {f.reason}" for f in failures[:shown])
    more = f"; and {len(failures) - shown} more" if len(failures) > shown else ""
    return f"{data} (after {len(failures)} unreadable files: {listed}{more})"


def _clusters(rows: list[Any]) -> np.ndarray:
    return cluster_ids([r.patient_id for r in rows], [r.source for r in rows])


def _site_name(options: AdaptOptions) -> str:
    return options.site or options.data.resolve().stem


def _summary(
    options: AdaptOptions, predictor: Predictor, fit: SiteFit, counts: dict[str, int]
) -> dict[str, Any]:
    """What ModelInfo.metadata["adaptation"] records."""
    return {
        "site": _site_name(options),
        "base_model": predictor.path.name,
        "base_version": predictor.version,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": options.method,
        "head": "refitted" if fit.adopted else "base",
        "verdict": fit.verdict,
        "counts": counts,
        "c": fit.c,
        "cross_validation": {
            "by": "patient",
            "folds": fit.cv.folds if fit.cv else None,
            "repeats": fit.cv.repeats if fit.cv else None,
            "base": asdict(fit.base),
            "adapted": asdict(fit.adapted) if fit.adapted else None,
        },
    }


def _info(base: ModelInfo, site: str, fit: SiteFit, summary: dict[str, Any]) -> ModelInfo:
    day = datetime.now(UTC).strftime("%Y%m%d")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", site).strip("-").lower() or "site"
    data = base.to_dict()
    data["version"] = f"{base.version}+{slug}-{day}"
    data["metadata"] = {**base.metadata, "adaptation": summary}
    data["thresholds"], data["operating_point"] = fit.thresholds, fit.operating_point
    return ModelInfo.from_dict(data)


def _load(options: AdaptOptions) -> tuple[Predictor, LocalFeatures, list[Exclusion]]:
    rows = load_labelled(options.data)
    check_counts(np.array([row.target for row in rows]), _clusters(rows), str(options.data))
    predictor = Predictor(options.model, threads=options.threads)
    local = extract_features(predictor, rows, workers=options.workers)
    return predictor, local, rows.excluded


def adapt(options: AdaptOptions) -> AdaptResult:
    """Adapt the model to the site's labelled radiographs and write the adapted model."""
    start = time.perf_counter()
    parse_operating_point(options.operating_point)  # refuse a bad option before any work
    predictor, local, excluded = _load(options)
    y, clusters = local.targets, _clusters(local.rows)
    check_counts(y, clusters, _after_failures(options.data, local.failures))
    metadata = onnx_runtime(predictor).session.get_modelmeta().custom_metadata_map
    _, cam = parse_metadata(metadata, str(predictor.path))
    if cam is None:
        raise ModelError(f"{predictor.path}: no CAM head in the model's metadata to adapt")
    fit = fit_site(
        local.pooled,
        local.base_logits,
        y,
        clusters,
        LinearHead(cam.weight.astype(np.float64), cam.bias),
        method=options.method,
        operating_point=options.operating_point,
        repeats=options.repeats,
        resamples=options.resamples,
        seed=options.seed,
    )
    counts = {
        "covid": int(y.sum()),
        "non_covid": int(y.size - y.sum()),
        "patients": int(np.unique(clusters).size),
        "unreadable": len(local.failures),
    }
    site = _site_name(options)
    info = _info(predictor.info, site, fit, _summary(options, predictor, fit, counts))
    write_adapted(predictor.path, options.out, fit.head, info)
    _check_written(options.out, local, fit.head)
    return AdaptResult(
        options.out, site, counts, fit, info, local.failures, excluded, time.perf_counter() - start
    )


def _check_written(path: Path, local: LocalFeatures, head: LinearHead) -> None:
    """The written model must compute the head that was fitted (guards the graph rewrite)."""
    if local.sample is None:
        return
    written = Predictor(path, threads=1).runtime.logits(local.sample)[0]
    expected = head.logits(local.pooled[:1])[0]
    if not np.isclose(written, expected, rtol=1e-3, atol=1e-3):
        path.unlink(missing_ok=True)
        raise ModelError(f"{path}: the written model gives logit {written:.4f}, not {expected:.4f}")
