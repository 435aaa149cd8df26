"""What the input gate costs per image, against the COVID-19 classifier's own cost in the same run.

On the same real radiographs (decoded once), interleaved so that load from other processes
hits both alike:
  gate         `InputGate.check`: DICOM header rules + resize/equalise to 128 px + the gate ONNX;
  classifier   `Predictor` with the gate off: preprocess + model + sigmoid (`predict_batch` of
               one already-decoded radiograph), for the shipped fp32 and int8 models;
  (NIH 448-px PNGs and Kaggle 224-px JPEGs, half each)
  end to end   `Predictor.predict(path)` with the gate on and off (read + decode included).
Prints p50/p90 in ms and the gate's cost as a fraction of each. One ONNX thread, as served.

    python benchmarks/gate_speed.py [--images 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from covid_cxr.gate import InputGate
from covid_cxr.imaging import read_radiograph
from covid_cxr.inference.predictor import Predictor
from covid_cxr.paths import DEFAULT_MODEL, data_root, shipped_model


def images(count: int) -> list[Path]:
    root = data_root()
    nih = sorted((root / "nih-chestxray8-subset" / "No_Finding").glob("*.png"))
    kaggle = sorted((root / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))
    return (nih[: count // 2] + kaggle[: count - count // 2])[:count]


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    paths = images(args.images)
    radiographs = [read_radiograph(p) for p in paths]
    gate = InputGate()
    models = {"fp32": DEFAULT_MODEL, "int8": shipped_model("covid-cxr-default-int8.onnx")}
    plain = {k: Predictor(m, threads=1, gate=False) for k, m in models.items() if m.is_file()}
    gated = Predictor(DEFAULT_MODEL, threads=1)
    runs: dict[str, list[float]] = {"gate": []}
    runs.update({f"classifier {k}": [] for k in plain})
    runs.update({"end to end fp32, gate off": [], "end to end fp32, gate on": []})
    for _ in range(args.repeats):
        for path, radiograph in zip(paths, radiographs, strict=True):
            runs["gate"].append(timed(lambda r=radiograph: gate.check(r)))
            for kind, predictor in plain.items():
                runs[f"classifier {kind}"].append(
                    timed(lambda r=radiograph, p=predictor: p.predict(r))
                )
            runs["end to end fp32, gate off"].append(timed(lambda p=path: plain["fp32"].predict(p)))
            runs["end to end fp32, gate on"].append(timed(lambda p=path: gated.predict(p)))
    print(f"{len(paths)} real radiographs x {args.repeats}; load average {os.getloadavg()}")
    p50 = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{name:<28} p50 {p50[name]:7.2f} ms   p90 {p90:7.2f} ms")
    for name in runs:
        if name != "gate":
            print(f"gate / {name}: {p50['gate'] / p50[name]:.2f}x")


if __name__ == "__main__":
    main()
