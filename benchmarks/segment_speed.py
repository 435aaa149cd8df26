"""Lung segmenter speed on this CPU, against the shipped classifier measured in the same run.

On one real radiograph (JSRT, 512 px PNG by default), one ONNX Runtime thread each:
  model p50/p99   the ONNX model alone on one preprocessed input (batch 1);
  e2e p50/p99     `LungSegmenter.segment(pixels)`: preprocess + model + resize to the
                  radiograph's size + post-processing (decoding excluded), and for the
                  classifier `Predictor.predict_pixels`-equivalent: preprocess + model;
the segmenter runs at its own input size (ModelInfo.preprocess.size). Goal from issue #9:
about 10 ms at 256 px. Other engineers share the CPU: the load average is printed; run it twice.

    python benchmarks/segment_speed.py [--image PATH] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from covid_cxr.imaging import preprocess, read_radiograph
from covid_cxr.inference.runtime import OnnxRuntime
from covid_cxr.paths import DEFAULT_MODEL, data_root
from covid_cxr.segmentation import LungSegmenter


def timed(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    for _ in range(3):
        work()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=data_root() / "jsrt/images/JPCLN009.png")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    pixels = read_radiograph(args.image).pixels
    segmenter = LungSegmenter(threads=1)
    seg_input = preprocess(pixels, segmenter.info.preprocess)[None, None]
    classifier = OnnxRuntime(DEFAULT_MODEL, threads=1)
    cls_input = preprocess(pixels, classifier.info.preprocess)[None, None]
    rows = [
        ("segmenter model", timed(lambda: segmenter.logits(seg_input), args.repeats)),
        ("segmenter e2e", timed(lambda: segmenter.segment(pixels), args.repeats)),
        ("classifier model", timed(lambda: classifier.logits(cls_input), args.repeats)),
        (
            "classifier e2e",
            timed(
                lambda: classifier.logits(
                    preprocess(pixels, classifier.info.preprocess)[None, None]
                ),
                args.repeats,
            ),
        ),
    ]
    size = segmenter.info.preprocess.size
    print(
        f"image {args.image.name} {pixels.shape[1]}x{pixels.shape[0]}; segmenter at {size} px, "
        f"classifier at {classifier.info.preprocess.size} px; 1 ONNX Runtime thread"
    )
    for name, (p50, p99) in rows:
        print(f"{name:18} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")
    ratio = rows[1][1][0] / rows[3][1][0]
    print(f"segmenter e2e / classifier e2e: {ratio:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
