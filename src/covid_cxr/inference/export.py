"""`covid-cxr export`: checkpoint -> ONNX fp32 (checked against PyTorch) -> optional int8,
with the accuracy that quantisation costs measured on validation radiographs."""

from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from covid_cxr.errors import DataError, ModelError, failure_reason
from covid_cxr.imaging import PreprocessConfig, read_radiograph
from covid_cxr.inference.batch import Failure, gather, map_ordered
from covid_cxr.inference.onnx_export import export_onnx, max_logit_difference, sample_batch
from covid_cxr.inference.predictor import resolve_model_path
from covid_cxr.inference.quantize import DEFAULT_METHOD, CalibrationMethod, quantize_int8
from covid_cxr.inference.runtime import OnnxRuntime, sigmoid
from covid_cxr.segmentation.inputs import model_input

PARITY_IMAGES = 16
PARITY_TOLERANCE = 1e-4  # on logits
AUC_DROP_GOAL = 0.005


@dataclass
class LoadedImages:
    """Preprocessed model inputs (N, 1, S, S), their files, and the files that failed."""

    inputs: np.ndarray
    paths: list[Path]
    failures: list[Failure] = field(default_factory=list)


def load_inputs(
    paths: Sequence[Path], config: PreprocessConfig, *, workers: int = 2, what: str = "images"
) -> LoadedImages:
    """Read and preprocess in parallel; unreadable files are kept as failures, not fatal."""

    def work(path: Path) -> np.ndarray:
        return model_input(read_radiograph(path).pixels, config, source=str(path)).pixels

    arrays, kept, failures = [], [], []
    results = map_ordered(work, paths, workers=workers, ahead=4 * max(1, workers))
    for path, result in tqdm(results, total=len(paths), desc=f"reading {what}", unit="img"):
        if isinstance(result, BaseException):
            failures.append(Failure(str(path), failure_reason(result)))
        else:
            arrays.append(result)
            kept.append(path)
    for failure in failures:
        print(f"  skipped {failure.source}: {failure.reason}", file=sys.stderr)
    size = config.size
    inputs = np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, size, size), np.float32)
    return LoadedImages(inputs.astype(np.float32, copy=False), kept, failures)


def _labelled_rows(source: Path, split: str) -> tuple[list, str]:
    """Rows of `split` when the data has splits (a manifest), else every row."""
    from covid_cxr.data.manifest import load_labelled

    rows = list(load_labelled(source))
    chosen = [r for r in rows if r.split == split]
    if chosen:
        return chosen, f"{source} ({split} split)"
    return rows, str(source)


def calibration_files(source: Path, count: int, seed: int = 0) -> tuple[list[Path], str]:
    """Up to `count` radiographs from a folder (recursive) or a manifest's train split."""
    if source.is_dir():
        files, where = gather([str(source)]).files, str(source)
    elif source.is_file():
        rows, where = _labelled_rows(source, "train")
        files = [r.path for r in rows]
    else:
        raise DataError(f"{source}: calibration data not found (give a folder or a manifest CSV)")
    if not files:
        raise DataError(f"{source}: no radiographs found for calibration")
    if len(files) > count:
        files = sorted(random.Random(seed).sample(files, count))
    return files, where


@dataclass(frozen=True)
class Scores:
    auc: float
    accuracy: float


def score(probabilities: np.ndarray, targets: np.ndarray, threshold: float) -> Scores:
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(targets, probabilities)) if len(set(targets)) == 2 else float("nan")
    return Scores(auc, float(np.mean((probabilities >= threshold) == targets.astype(bool))))


def probabilities(onnx_path: Path, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    runtime = OnnxRuntime(onnx_path, threads=None)
    logits = [runtime.logits(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return sigmoid(np.concatenate(logits))


def _skipped(images: LoadedImages) -> str:
    return f" ({len(images.failures)} unreadable, skipped)" if images.failures else ""


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def export_model(
    model_path: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    calibration: Path | None = None,
    calibration_count: int = 200,
    method: CalibrationMethod = DEFAULT_METHOD,
    float_head: bool = True,
    validate_on: Path | None = None,
    fp32_out: Path | None = None,
    workers: int = 2,
) -> dict[str, object]:
    """Run the whole export and print its report; returns the figures for callers and tests."""
    import torch

    from covid_cxr.models.checkpoint import load_checkpoint

    source = resolve_model_path(model_path)
    if source.suffix.lower() == ".onnx":
        raise ModelError(f"{source}: already ONNX; export starts from a PyTorch checkpoint")
    if int8 and calibration is None:
        raise DataError("--int8 needs --calibration DATA (a folder of radiographs or a manifest)")
    out = Path(out)
    model, info = load_checkpoint(source)
    info.metadata = {
        **info.metadata,
        "export": {"format": "onnx", "precision": "fp32", "torch": torch.__version__},
    }
    print(f"exporting {info.name} version {info.version} from {source}")
    cfg = info.preprocess
    validation = targets = None
    if validate_on is not None:
        rows, where = _labelled_rows(validate_on, "val")
        validation = load_inputs([r.path for r in rows], cfg, workers=workers, what="validation")
        by_path = {r.path: r.target for r in rows}
        targets = np.array([by_path[p] for p in validation.paths])
        print(
            f"validation: {len(targets)} radiographs from {where}, {int(targets.sum())} COVID-19"
            f"{_skipped(validation)}"
        )
    calib = None
    if calibration is not None:
        files, where = calibration_files(calibration, calibration_count)
        calib = load_inputs(files, cfg, workers=workers, what="calibration")
        if not len(calib.inputs):
            raise DataError(f"{calibration}: none of the calibration radiographs could be read")
        print(f"calibration: {len(calib.inputs)} radiographs from {where}{_skipped(calib)}")

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="covid-cxr-export-") as tmp:
        fp32 = fp32_out or (Path(tmp) / "fp32.onnx" if int8 else out)
        cam_head = export_onnx(model, info, fp32)
        sets = (validation, calib)
        real = next((s.inputs for s in sets if s is not None and len(s.inputs)), None)
        check = real[:PARITY_IMAGES] if real is not None else sample_batch(info, 4).numpy()
        diff = max_logit_difference(model, fp32, check)
        results["max_logit_difference"] = diff
        print(
            f"ONNX fp32   {_size(fp32):>9}  max |logit ONNX - PyTorch| = {diff:.1e} "
            f"on {len(check)} {'real' if real is not None else 'random'} inputs"
            f"{'' if cam_head else '  (no CAM: head is not pooled-linear)'}"
        )
        if diff > PARITY_TOLERANCE:
            raise ModelError(
                f"ONNX Runtime disagrees with PyTorch by up to {diff:.2e} in logit "
                f"(tolerance {PARITY_TOLERANCE}); the export is not trustworthy"
            )
        if int8:
            assert calib is not None
            quantize_int8(fp32, out, calib.inputs, method=method, float_head=float_head)
            kept = "linear head kept float" if float_head else "every layer int8"
            print(f"ONNX int8   {_size(out):>9}  {method} calibration, {kept}")
        if validation is not None and targets is not None:
            results.update(_validate(fp32, out if int8 else None, validation, targets, info))
    print(f"wrote {out}")
    return results


def _validate(
    fp32: Path, int8: Path | None, data: LoadedImages, targets: np.ndarray, info: object
) -> dict[str, object]:
    threshold = info.threshold  # type: ignore[attr-defined]
    p32 = probabilities(fp32, data.inputs)
    s32 = score(p32, targets, threshold)
    print(f"{'':11}{'AUC':>8}  accuracy@{threshold:.2f}")
    print(f"{'ONNX fp32':11}{s32.auc:8.4f}  {s32.accuracy:8.4f}")
    results: dict[str, object] = {"fp32": s32}
    if int8 is None:
        return results
    p8 = probabilities(int8, data.inputs)
    s8 = score(p8, targets, threshold)
    auc_change, acc_change = s8.auc - s32.auc, s8.accuracy - s32.accuracy
    flips = int(np.sum((p8 >= threshold) != (p32 >= threshold)))
    print(f"{'ONNX int8':11}{s8.auc:8.4f}  {s8.accuracy:8.4f}")
    print(f"{'change':11}{auc_change:+8.4f}  {acc_change:+8.4f}")
    print(
        f"int8 vs fp32: |probability change| mean {np.mean(np.abs(p8 - p32)):.4f}, "
        f"max {np.max(np.abs(p8 - p32)):.4f}; {flips} of {len(p32)} labels flipped"
    )
    verdict = "met" if -auc_change < AUC_DROP_GOAL else "NOT met: consider shipping fp32"
    print(f"goal AUC drop < {AUC_DROP_GOAL}: {verdict}")
    results.update(int8=s8, auc_change=auc_change, accuracy_change=acc_change, flips=flips)
    return results
