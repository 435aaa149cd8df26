"""Whole-path speed of the shipped lung-crop model beside the whole-image path it replaced.

    python benchmarks/lung_path_speed.py --before OLD.onnx [--image JPEG] [--threads 1]

OLD.onnx: the previous shipped model (whole image, no segmentation), e.g.
`git show d79af38:src/covid_cxr/shipped/covid-cxr-default.onnx > /tmp/before.onnx`.
For each model, on the same real 640-pixel JPEG, `Predictor.predict(path)` end to end as
`covid-cxr predict` and the service run it (input gate on), p50 and p99 over --repeats, split
into read, gate, preprocess (for the lung-crop model: segment + crop + attenuate) and model;
then the lung segmenter alone on the decoded pixels. Ratios are against the "before" path in
the same run, so a busy machine shows in both. Issue #9's goal: whole path p50 <= 10 ms.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from covid_cxr.imaging import read_radiograph
from covid_cxr.inference.predictor import Predictor
from covid_cxr.paths import DEFAULT_MODEL, shipped_model
from inference_speed import find_jpeg, percentile, timed

PARTS = ("read", "gate", "preprocess", "model")


def measure(name: str, model: Path, image: Path, threads: int, repeats: int) -> float:
    """Print one model's end-to-end row; return its p50 in ms."""
    predictor = Predictor(model, threads=threads)
    runs: list[dict[str, float]] = []
    e2e = timed(lambda: runs.append(predictor.predict(image).timings_ms), repeats)
    parts = "  ".join(f"{p} {percentile([r[p] for r in runs], 50):5.1f}" for p in PARTS)
    p50 = percentile(e2e, 50)
    print(f"{name:34} p50 {p50:6.2f}  p99 {percentile(e2e, 99):6.2f}  | {parts}")
    if predictor.lungs is not None:
        pixels = read_radiograph(image).pixels
        alone = timed(lambda: predictor.lungs.segment(pixels), repeats)
        print(f"{'  lung segmenter alone':34} p50 {percentile(alone, 50):6.2f}")
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the whole-image model")
    parser.add_argument("--image", type=Path, help="default: a 640-pixel JPEG from the datasets")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per model")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    image = args.image or find_jpeg()
    print(f"load average before: {os.getloadavg()}; image {image}; {args.threads} thread(s)")
    started = time.perf_counter()
    before = measure("before: whole image (fp32)", args.before, image, args.threads, args.repeats)
    rows = {
        "shipped lung crop (fp32)": DEFAULT_MODEL,
        "shipped lung crop (int8)": shipped_model("covid-cxr-default-int8.onnx"),
    }
    for name, model in rows.items():
        p50 = measure(name, model, image, args.threads, args.repeats)
        print(
            f"{'  vs before':34} {p50 / before:5.2f}x   goal p50 <= 10 ms: "
            f"{'met' if p50 <= 10 else 'not met'}"
        )
    print(f"load average after: {os.getloadavg()} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
