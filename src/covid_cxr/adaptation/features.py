"""Frozen features of local radiographs: the base model's pooled `features` output and logit.

Images are read and preprocessed by the Predictor itself (its `prepare`, so exactly as in
training and inference, input gate included); a file that cannot be read or is out of scope
becomes a listed `Failure`, never a silent drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from covid_cxr.data.manifest import ManifestRow
from covid_cxr.errors import ModelError, failure_reason
from covid_cxr.inference.batch import Failure, map_ordered
from covid_cxr.inference.metadata import FEATURES, INPUT, LOGIT
from covid_cxr.inference.predictor import Predictor, PreparedImage
from covid_cxr.inference.runtime import OnnxRuntime


@dataclass
class LocalFeatures:
    """The scored rows with their pooled features (n, d) and base logits (n,)."""

    rows: list[ManifestRow]
    pooled: np.ndarray
    base_logits: np.ndarray
    failures: list[Failure]
    sample: np.ndarray | None  # one preprocessed input (1, 1, S, S), to check the written model

    @property
    def targets(self) -> np.ndarray:
        return np.array([row.target for row in self.rows], dtype=np.int64)


def onnx_runtime(predictor: Predictor) -> OnnxRuntime:
    """The predictor's ONNX session, refused with the reason when it cannot be adapted."""
    runtime = predictor.runtime
    if not isinstance(runtime, OnnxRuntime):
        raise ModelError(
            f"{predictor.path}: adapt works on an ONNX model (its frozen `features` output); "
            "export the checkpoint first with `covid-cxr export --format onnx`"
        )
    if runtime.cam_unavailable:
        raise ModelError(
            f"{predictor.path}: this ONNX model has no `features` output or CAM head "
            "(global-average-pool -> linear), which adapt refits; export it with `covid-cxr export`"
        )
    return runtime


def _pool(runtime: OnnxRuntime, chunk: list[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
    batch = np.stack([p.input for p in chunk])[:, None].astype(np.float32, copy=False)
    logit, features = runtime.session.run([LOGIT, FEATURES], {INPUT: batch})
    return features.mean(axis=(2, 3), dtype=np.float64), logit.reshape(-1).astype(np.float64)


def extract_features(
    predictor: Predictor, rows: Sequence[ManifestRow], *, batch_size: int = 32, workers: int = 2
) -> LocalFeatures:
    """Pooled features and base logits of every readable row, in row order."""
    runtime = onnx_runtime(predictor)
    kept: list[ManifestRow] = []
    failures: list[Failure] = []
    pooled: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    pending: list[PreparedImage] = []
    sample = None

    def flush() -> None:
        if pending:
            features, logit = _pool(runtime, pending)
            pooled.append(features)
            logits.append(logit)
            pending.clear()

    def prepare(row: ManifestRow) -> PreparedImage:
        return predictor.prepare(row.path)

    for row, result in map_ordered(prepare, rows, workers=workers, ahead=2 * batch_size):
        if isinstance(result, BaseException):
            failures.append(Failure(str(row.path), failure_reason(result)))
            continue
        result = cast(PreparedImage, result)
        if sample is None:
            sample = result.input[None, None].astype(np.float32)
        kept.append(row)
        pending.append(result)
        if len(pending) >= batch_size:
            flush()
    flush()
    if not kept:
        return LocalFeatures([], np.zeros((0, 0)), np.zeros(0), failures, None)
    return LocalFeatures(kept, np.concatenate(pooled), np.concatenate(logits), failures, sample)
