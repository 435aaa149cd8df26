"""`LungSegmenter`: lung masks from radiographs with an exported segmenter, without torch.

It repeats the model's own preprocessing (from the ONNX metadata), runs ONNX Runtime,
post-processes (two largest components, holes filled) and maps the mask back to the
radiograph's own size. One instance can be shared by threads (`InferenceSession.run` is
thread-safe).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covid_cxr.errors import ModelError
from covid_cxr.imaging import Radiograph, preprocess, read_radiograph
from covid_cxr.inference.metadata import INPUT, LOGIT, parse_metadata
from covid_cxr.paths import shipped_model
from covid_cxr.segmentation.masks import LungMask, lung_mask

DEFAULT_SEGMENTER = shipped_model("covid-cxr-lungs.onnx")
TASK = "segmentation"

Source = str | Path | bytes | Radiograph | np.ndarray


def _pixels(source: Source) -> np.ndarray:
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise ValueError(
                f"expected (H, W) grayscale pixels in [0, 1], got shape {source.shape}"
            )
        return source.astype(np.float32, copy=False)
    radiograph = source if isinstance(source, Radiograph) else read_radiograph(source)
    return radiograph.pixels


class LungSegmenter:
    """`segment(radiograph_or_pixels) -> LungMask` at the input's own size.

    `model`: an ONNX file exported from a "lite0-unet" training run (its ModelInfo records
    task "segmentation"); default: the shipped `covid-cxr-lungs.onnx`.
    """

    def __init__(self, model: str | Path | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        from covid_cxr.inference.runtime import session_options

        path = Path(model) if model is not None else DEFAULT_SEGMENTER
        if not path.is_file():
            raise ModelError(f"{path}: segmentation model not found (an .onnx file is needed)")
        options = session_options(threads)
        # The U-Net's decoder activations at full input resolution are large; without the
        # arena they are returned after each call instead of held by every server worker.
        options.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from exc
        self.info, _ = parse_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        if self.info.metadata.get("task") != TASK:
            raise ModelError(
                f"{path}: {self.info.name} is not a lung segmenter (its metadata records task "
                f"{self.info.metadata.get('task', 'classification')!r}); give an ONNX file "
                "exported from a segmentation run"
            )
        self.path = path

    def __repr__(self) -> str:
        return f"LungSegmenter({self.path.name}, {self.info.name}, {self.info.version})"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, S, S) preprocessed inputs -> (N, S, S) lung logits."""
        (logit,) = self.session.run([LOGIT], {INPUT: np.ascontiguousarray(batch, np.float32)})
        return logit[:, 0]

    def segment(self, source: Source) -> LungMask:
        """Read (unless given pixels), segment and post-process one radiograph."""
        return self.segment_batch([source])[0]

    def segment_batch(self, sources: Sequence[Source]) -> list[LungMask]:
        pixels = [_pixels(source) for source in sources]
        if not pixels:
            return []
        config = self.info.preprocess
        batch = np.stack([preprocess(p, config) for p in pixels])[:, None]
        logits = self.logits(batch)
        return [lung_mask(logit, p.shape, config) for logit, p in zip(logits, pixels, strict=True)]
