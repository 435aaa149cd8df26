"""The two engines behind the Predictor: a PyTorch checkpoint or an ONNX Runtime session.

Both take a preprocessed float32 batch (N, 1, S, S) and return logits (N,), and on request
Grad-CAM maps (N, h, w). Both are safe to call from many threads at once: ONNX Runtime's
`InferenceSession.run` is thread-safe, and PyTorch runs under `inference_mode` without shared
mutable state. Grad-CAM puts a forward hook on the model, which would also catch activations
of other threads' forward passes, so it runs on its own copy of the model, one call at a time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from covid_cxr.errors import ModelError
from covid_cxr.inference.metadata import FEATURES, INPUT, LOGIT, parse_metadata
from covid_cxr.numeric import sigmoid as sigmoid  # re-exported: predictor and export use it

if TYPE_CHECKING:
    from covid_cxr.models.info import ModelInfo


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class Runtime(Protocol):
    kind: str
    info: ModelInfo
    cam_unavailable: str | None  # why Grad-CAM cannot be computed, or None when it can

    def logits(self, batch: np.ndarray) -> np.ndarray: ...

    def logits_and_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Logits, maps, and the milliseconds spent on the model and on the map."""


class TorchRuntime:
    """A covid-cxr checkpoint run by PyTorch (eager, fp32)."""

    kind = "pytorch"
    cam_unavailable: str | None = None

    def __init__(self, path: Path, threads: int | None) -> None:
        import torch

        from covid_cxr.models.checkpoint import load_checkpoint

        if threads:
            # PyTorch has one intra-op pool per process: this applies to the whole process.
            torch.set_num_threads(threads)
        self._torch = torch
        self.model, self.info = load_checkpoint(path)
        self._cam_model: Any = None
        self._cam_lock = threading.Lock()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.from_numpy(batch)).float().numpy()

    def logits_and_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        import copy

        from covid_cxr.explain.gradcam import grad_cam

        # One forward + backward pass gives both, so all of it counts as Grad-CAM time.
        with self._cam_lock:
            if self._cam_model is None:
                self._cam_model = copy.deepcopy(self.model)
            start = time.perf_counter()
            logits, maps = grad_cam(self._cam_model, self._torch.from_numpy(batch))
            cam_ms = elapsed_ms(start)
        return logits.float().numpy(), maps, 0.0, cam_ms


def session_options(threads: int | None, *, spinning: bool = False) -> Any:
    """ORT settings measured in benchmarks/inference_speed.py: full graph optimisation (2.7x
    faster than basic in fp32, 4.5x in int8, whose QDQ pairs fuse into int8 kernels only above
    the basic level), sequential execution (the graph is a chain; parallel mode was 2x slower),
    no spin-waiting (spinning threads doubled latency on this shared 2-core machine), and one
    intra-op thread unless told otherwise: EfficientNet-Lite0 at batch 1 ran no faster on two,
    and a single thread leaves the other core to a concurrent request or to decoding."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


class OnnxRuntime:
    """An exported model (fp32 or int8) run by ONNX Runtime on the CPU."""

    kind = "onnx"

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(
                str(path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info, head = parse_metadata(meta, str(path))
        outputs = {o.name for o in self.session.get_outputs()}
        self._cam_weight = None if head is None else head.weight
        self.cam_unavailable: str | None = None
        if FEATURES not in outputs or head is None:
            self.cam_unavailable = (
                f"Grad-CAM is unavailable for this ONNX model ({self.info.name}: its head is not "
                "global-average-pool -> linear); use its PyTorch checkpoint for Grad-CAM"
            )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        (logit,) = self.session.run([LOGIT], {INPUT: batch})
        return logit.reshape(-1)

    def logits_and_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        from covid_cxr.explain.gradcam import cam_from_features

        start = time.perf_counter()
        logit, features = self.session.run([LOGIT, FEATURES], {INPUT: batch})
        model_ms, start = elapsed_ms(start), time.perf_counter()
        maps = cam_from_features(features, self._cam_weight)
        return logit.reshape(-1), maps, model_ms, elapsed_ms(start)


def open_runtime(path: Path, threads: int | None) -> Runtime:
    """ONNX for `.onnx` files, PyTorch for checkpoints (which `read_checkpoint` validates)."""
    if path.suffix.lower() == ".onnx":
        return OnnxRuntime(path, threads)
    return TorchRuntime(path, threads)
