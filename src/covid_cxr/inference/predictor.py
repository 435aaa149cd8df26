"""`covid_cxr.Predictor`: one object that turns a radiograph into a probability and a label.

It repeats exactly what training did (the model's own PreprocessConfig through the one
`preprocess` function), runs a PyTorch checkpoint or an ONNX export, and can explain the
prediction with Grad-CAM. One instance is meant to be shared by every thread of the web
service.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covid_cxr.errors import ModelError
from covid_cxr.gate import GateResult, InputGate, gate_enabled
from covid_cxr.imaging import Radiograph, read_radiograph
from covid_cxr.imaging.preprocess import Box
from covid_cxr.inference.runtime import Runtime, elapsed_ms, open_runtime, sigmoid
from covid_cxr.models.info import ModelInfo
from covid_cxr.paths import DEFAULT_MODEL
from covid_cxr.segmentation.inputs import model_input
from covid_cxr.segmentation.segmenter import LungSegmenter

MODEL_ENV = "COVID_CXR_MODEL"
COVID, NON_COVID = "COVID-19", "non-COVID"

Source = str | Path | bytes | Radiograph


@dataclass
class Prediction:
    """One radiograph's result.

    `timings_ms` has read, gate, preprocess, model, cam and total. In a batch, model and cam are the
    batch's time shared equally among its images. PyTorch Grad-CAM gets the logits from its own
    forward + backward pass, so there all of it counts as cam and model is 0.
    """

    source: str
    probability: float
    label: str
    positive: bool
    threshold: float
    model_version: str
    timings_ms: dict[str, float]
    radiograph: Radiograph = field(repr=False)
    cam: np.ndarray | None = field(default=None, repr=False)
    # Notes to show beside the result (e.g. an age the model never saw); never refusals.
    warnings: tuple[str, ...] = ()
    # The input gate's P(frontal chest radiograph); None when the gate is off.
    gate_score: float | None = None
    # (top, left, height, width) of the radiograph the model saw: where `cam` goes back.
    box: Box | None = None


@dataclass
class PreparedImage:
    """A radiograph read and preprocessed, ready for the model (the part worth parallelising)."""

    radiograph: Radiograph
    input: np.ndarray  # (S, S) float32, the output of `preprocess`
    read_ms: float
    preprocess_ms: float
    gate: GateResult | None = None
    box: Box | None = None  # the radiograph region `input` covers (see `Prediction.box`)


def resolve_model_path(model: str | Path | None) -> Path:
    """The file to load: the argument, else $COVID_CXR_MODEL, else the shipped default model.

    A folder means a training run and resolves to its `best.pt`.
    """
    if model is None:
        env = os.environ.get(MODEL_ENV)
        path = Path(env) if env else DEFAULT_MODEL
        origin = f"${MODEL_ENV}" if env else "the shipped default model"
        if not path.exists():
            raise ModelError(
                f"{origin} {path} does not exist. Point to a model with --model PATH "
                f"(or Predictor(model=PATH), or ${MODEL_ENV}=PATH): a PyTorch checkpoint (.pt), "
                "a training run folder, or an ONNX file from `covid-cxr export`. The default "
                "model ships inside the package (covid_cxr/shipped/); train your own with "
                "`covid-cxr train` and export it with `covid-cxr export`."
            )
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"{path}: model not found (expected a .pt, .onnx or run folder)")
    if path.is_dir():
        best = path / "best.pt"
        if not best.is_file():
            raise ModelError(
                f"{path}: a folder is read as a training run, but it has no best.pt "
                "(give the checkpoint or .onnx file itself)"
            )
        return best
    return path


class Predictor:
    """Load a model once, predict many radiographs (from any number of threads).

    model: a PyTorch checkpoint (.pt), a training run folder (its best.pt), or an ONNX file
        exported by `covid-cxr export`; None means $COVID_CXR_MODEL or the shipped default.
    threads: intra-op threads of the model. ONNX: per session, default 1 (as fast as 2 at
        batch 1 here, and it leaves the other core to concurrent requests). PyTorch: sets the
        process-wide torch thread count; None leaves it alone.
    operating_point: a name in the model's thresholds (e.g. "youden") instead of its default.
    gate: refuse images that are not frontal chest radiographs (OutOfScopeError) before the
        model sees them. None means on unless $COVID_CXR_GATE=off; False bypasses the check,
        for research only (the model then scores whatever it is given).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        threads: int | None = None,
        operating_point: str | None = None,
        gate: bool | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ModelError(f"threads must be at least 1, got {threads}")
        self.path = resolve_model_path(model)
        self.runtime: Runtime = open_runtime(self.path, threads)
        self.info: ModelInfo = self.runtime.info
        task = self.info.metadata.get("task", "classification")
        if task != "classification":
            raise ModelError(
                f"{self.path}: a {task} model ({self.info.name}), not a COVID-19 classifier; "
                "use `covid-cxr segment` / covid_cxr.segmentation.LungSegmenter for it"
            )
        point = operating_point or self.info.operating_point
        if point not in self.info.thresholds:
            raise ModelError(
                f"{self.path}: no operating point {point!r}; "
                f"the model has {sorted(self.info.thresholds)}"
            )
        self.operating_point = point
        self.threshold = float(self.info.thresholds[point])
        self.gate: InputGate | None = InputGate() if gate_enabled(gate) else None
        # Only models that crop to the lungs load the segmenter (shared by all threads).
        self.lungs = LungSegmenter(threads=threads) if self.info.preprocess.needs_lungs else None

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def cam_available(self) -> bool:
        return self.runtime.cam_unavailable is None

    def __repr__(self) -> str:
        return (
            f"Predictor({str(self.path)!r}, {self.runtime.kind}, {self.info.name} "
            f"version {self.version}, threshold={self.threshold:g} [{self.operating_point}], "
            f"gate {'on' if self.gate else 'OFF'})"
        )

    def prepare(self, source: Source, *, name: str | None = None) -> PreparedImage:
        """Read (unless given a Radiograph), pass the input gate, preprocess as in training.

        Raises OutOfScopeError (a RadiographError) for what the model cannot judge, and
        NoLungsError when a model that crops to the lungs gets an image without any.
        """
        start = time.perf_counter()
        given = isinstance(source, Radiograph)
        radiograph = source if given else read_radiograph(source, name=name)
        read_ms = 0.0 if given else elapsed_ms(start)
        gate = self.gate.check(radiograph) if self.gate is not None else None
        start = time.perf_counter()
        made = model_input(
            radiograph.pixels, self.info.preprocess, self.lungs, source=radiograph.source
        )
        return PreparedImage(radiograph, made.pixels, read_ms, elapsed_ms(start), gate, made.box)

    def predict(self, source: Source, *, name: str | None = None, cam: bool = False) -> Prediction:
        """Probability of COVID-19 for one radiograph (path, bytes or Radiograph)."""
        return self.predict_batch([self.prepare(source, name=name)], cam=cam)[0]

    def predict_batch(
        self,
        sources: Sequence[Source | PreparedImage],
        *,
        cam: bool = False,
        batch_size: int = 16,
    ) -> list[Prediction]:
        """Predict many radiographs, running the model `batch_size` images at a time.

        Reading errors propagate (RadiographError names the file); `covid-cxr predict`
        prepares images itself to report them one by one instead.
        """
        if cam and self.runtime.cam_unavailable:
            raise ModelError(self.runtime.cam_unavailable)
        if batch_size < 1:
            raise ModelError(f"batch_size must be at least 1, got {batch_size}")
        prepared = [s if isinstance(s, PreparedImage) else self.prepare(s) for s in sources]
        results: list[Prediction] = []
        for offset in range(0, len(prepared), batch_size):
            results += self._run(prepared[offset : offset + batch_size], cam)
        return results

    def _run(self, chunk: list[PreparedImage], cam: bool) -> list[Prediction]:
        batch = np.stack([p.input for p in chunk])[:, None].astype(np.float32, copy=False)
        if cam:
            logits, maps, model_ms, cam_ms = self.runtime.logits_and_cam(batch)
        else:
            start = time.perf_counter()
            logits, maps = self.runtime.logits(batch), None
            model_ms, cam_ms = elapsed_ms(start), 0.0
        model_ms, cam_ms = model_ms / len(chunk), cam_ms / len(chunk)
        probabilities = sigmoid(np.asarray(logits).reshape(-1))
        results = []
        for i, (item, probability) in enumerate(zip(chunk, probabilities, strict=True)):
            positive = bool(probability >= self.threshold)
            timings = {
                "read": item.read_ms,
                "gate": item.gate.ms if item.gate else 0.0,
                "preprocess": item.preprocess_ms,
                "model": model_ms,
                "cam": cam_ms,
            }
            timings["total"] = sum(timings.values())
            results.append(
                Prediction(
                    source=item.radiograph.source,
                    probability=float(probability),
                    label=COVID if positive else NON_COVID,
                    positive=positive,
                    threshold=self.threshold,
                    model_version=self.version,
                    timings_ms=timings,
                    radiograph=item.radiograph,
                    cam=None if maps is None else maps[i],
                    warnings=item.gate.warnings if item.gate else (),
                    gate_score=item.gate.score if item.gate else None,
                    box=item.box,
                )
            )
        return results
