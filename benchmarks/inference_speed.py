"""Inference speed and memory on this CPU: PyTorch eager fp32, ONNX fp32 and ONNX int8 side by side.

For each engine, on the same real 640-pixel JPEG radiograph:
  e2e p50/p99   one `Predictor.predict(path)`: read + decode + preprocess + model + sigmoid;
  model p50/p99 the model alone on one preprocessed image;
  batch img/s   the model alone at batch 16;
  GFLOP/s, % of peak  model-only throughput against this CPU's fp32 peak (int8: 4x that);
  RSS           resident memory of a fresh process holding one loaded Predictor (psutil).
Then: ONNX Runtime session settings (optimisation level, threads, spinning), two requests at a
time sharing one Predictor (how the web service uses it), and parallel decoding in
`covid-cxr predict` (1 vs 2 decode threads).

Reference: the original Keras model's `model.predict` on one image takes 74-88 ms on this
2-core machine (team measurement; TensorFlow is not installed here). seed-cnn is that model,
so its PyTorch row is the like-for-like comparison. Goals for the shipped model: under 10 ms
end-to-end for a 640-pixel JPEG, and a loaded Predictor under 300 MiB resident.

Peak assumption: AMD EPYC Zen 4 (AVX-512 flags, family 25), 2 FMA pipes x 256-bit = 16 fp32
FMA = 32 fp32 FLOP per cycle per core at the clock /proc/cpuinfo reports (2.6 GHz, the nominal
clock as this KVM guest sees it; the cores boost to about 3.7 GHz, so both are shown); int8
VNNI (vpdpbusd) does 4 multiply-adds per 32-bit lane, so 4x the fp32 rate in int8 ops. Other
engineers share the CPU: the load average is printed before and after; run it twice.

Model: --model CKPT, else the default training config's model (configs/train/default.toml)
with random head weights built on the fly (speed does not depend on the weights); the shipped
ONNX model is measured too when it exists.

    python benchmarks/inference_speed.py [--model CKPT] [--image PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from covid_cxr.config import TrainConfig, load_config
from covid_cxr.imaging import read_radiograph
from covid_cxr.inference.batch import predict_files
from covid_cxr.inference.export import load_inputs
from covid_cxr.inference.onnx_export import export_onnx
from covid_cxr.inference.predictor import Predictor
from covid_cxr.inference.quantize import quantize_int8
from covid_cxr.models.checkpoint import ModelInfo, save_checkpoint
from covid_cxr.paths import DEFAULT_MODEL, REPO_ROOT, data_root

KERAS_MS = (74.0, 88.0)
GOAL_MS, GOAL_MIB = 10.0, 300.0
BATCH = 16
FP32_FLOP_PER_CYCLE = 32
INT8_SPEEDUP = 4
BOOST_GHZ = 3.7  # EPYC Zen 4 (Genoa) maximum boost


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def cpu_peak_gflops(cores: int) -> tuple[float, str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    mhz = [float(line.split(":")[1]) for line in lines if line.startswith("cpu MHz")]
    ghz = statistics.mean(mhz) / 1000 if mhz else 2.6
    peak = cores * ghz * FP32_FLOP_PER_CYCLE
    return peak, f"{cores} core(s) x {ghz:.2f} GHz x {FP32_FLOP_PER_CYCLE} FLOP/cycle"


def onnx_flops(path: Path) -> float:
    """FLOPs (2 x multiply-adds) of one image through the Conv and Gemm/MatMul nodes."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {
        v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]
    }
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            out = shapes.get(node.output[0])
            _, cin_per_group, *kernel = weights[node.input[1]]
            if out:
                macs += int(np.prod(out)) * cin_per_group * int(np.prod(kernel))
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in weights:
            macs += int(np.prod(weights[node.input[1]]))
    return 2.0 * macs


@dataclass
class Row:
    engine: str
    e2e: list[float]
    read: float  # p50 of the e2e runs' read + decode
    prep: float  # p50 of their preprocessing
    model: list[float]
    batch_img_s: float
    flops: float
    int8: bool
    rss_mib: float | None = None


def measure(engine: str, predictor: Predictor, image: Path, flops: float, repeats: int) -> Row:
    runs: list[dict[str, float]] = []
    e2e = timed(lambda: runs.append(predictor.predict(image).timings_ms), repeats)
    read = percentile([r["read"] for r in runs], 50)
    prep = percentile([r["preprocess"] for r in runs], 50)
    prepared = predictor.prepare(image).input[None, None]
    model = timed(lambda: predictor.runtime.logits(prepared), repeats)
    batch = np.repeat(prepared, BATCH, axis=0)
    batch_ms = timed(lambda: predictor.runtime.logits(batch), max(3, repeats // 10))
    int8 = "int8" in engine
    rate = BATCH * 1000 / statistics.median(batch_ms)
    return Row(engine, e2e, read, prep, model, rate, flops, int8)


def resident_mib(code: str) -> float:
    """RSS of a fresh interpreter after running `code`."""
    rss = "psutil.Process().memory_info().rss / 2**20"
    program = f"import json, psutil, sys; {code}; print(json.dumps({rss}))"
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=300
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def predictor_mib(model: Path, image: Path, threads: int) -> float:
    """A loaded Predictor after one prediction."""
    return resident_mib(
        "from covid_cxr.inference.predictor import Predictor; "
        f"p = Predictor({str(model)!r}, threads={threads}); p.predict({str(image)!r})"
    )


def find_jpeg(side: int = 640) -> Path:
    """A real JPEG (by content: some `.jpg` files in that collection are PNGs) of `side` px."""
    folder = data_root() / "covid-chestxray-dataset" / "images"
    for path in sorted(folder.glob("*.jp*g")):
        if path.read_bytes()[:2] == b"\xff\xd8":
            radiograph = read_radiograph(path)
            if max(radiograph.width, radiograph.height) == side:
                return path
    raise SystemExit(f"no {side}-pixel JPEG found under {folder}; pass --image")


def build_models(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, Path]:
    """(checkpoint, ONNX fp32, ONNX int8, seed-cnn checkpoint) in `work`."""
    import torch

    from covid_cxr.models import create
    from covid_cxr.models.checkpoint import load_checkpoint

    if args.model:
        checkpoint = Path(args.model)
        model, info = load_checkpoint(checkpoint)
    else:
        config = load_config(REPO_ROOT / "configs" / "train" / "default.toml", TrainConfig)
        torch.manual_seed(0)
        model = create(config.model.name, **{**config.model.options, "pretrained": True}).eval()
        info = ModelInfo(
            config.model.name, config.model.options, config.preprocess, version="random-head"
        )
        checkpoint = work / "model.pt"
        save_checkpoint(checkpoint, model, info)
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    export_onnx(model, info, fp32)
    jpegs = sorted((data_root() / "kaggle-normal-196").rglob("*.jp*g"))[:24]
    pngs = sorted((data_root() / "covid-19-image-repository" / "png").glob("*.png"))[:24]
    calibration = load_inputs(jpegs + pngs, info.preprocess, what="calibration")
    quantize_int8(fp32, int8, calibration.inputs)
    seed = create("seed-cnn", size=info.preprocess.size).eval()
    seed_path = work / "seed-cnn.pt"
    seed_info = ModelInfo(
        "seed-cnn", {"size": info.preprocess.size}, info.preprocess, version="random"
    )
    save_checkpoint(seed_path, seed, seed_info)
    return checkpoint, fp32, int8, seed_path


def print_table(rows: list[Row], threads: int) -> None:
    peak, how = cpu_peak_gflops(threads)
    boost = threads * BOOST_GHZ * FP32_FLOP_PER_CYCLE
    print(
        f"\nfp32 peak for {threads} thread(s): {peak:.0f} GFLOP/s ({how}), or {boost:.0f} at "
        f"the {BOOST_GHZ} GHz boost clock; int8 peak: x{INT8_SPEEDUP}. /proc/cpuinfo shows the "
        "nominal clock in this KVM guest; rates above 100% of it show the cores boosting."
    )
    header = (
        f"{'engine':28} {'e2e p50':>8} {'e2e p99':>8} {'read':>5} {'prep':>5} "
        f"{'model p50':>9} {'model p99':>9} "
        f"{'batch16 img/s':>13} {'GFLOP':>6} {'GFLOP/s':>8} {'% peak':>7} {'% boost':>7} "
        f"{'RSS MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        model_p50 = percentile(row.model, 50)
        rate = row.flops * row.batch_img_s / 1e9
        scale = INT8_SPEEDUP if row.int8 else 1
        share, boost_share = rate / (peak * scale) * 100, rate / (boost * scale) * 100
        rss = f"{row.rss_mib:8.0f}" if row.rss_mib is not None else f"{'-':>8}"
        print(
            f"{row.engine:28} {percentile(row.e2e, 50):8.2f} {percentile(row.e2e, 99):8.2f} "
            f"{row.read:5.1f} {row.prep:5.1f} "
            f"{model_p50:9.2f} {percentile(row.model, 99):9.2f} {row.batch_img_s:13.1f} "
            f"{row.flops / 1e9:6.2f} {rate:8.1f} {share:6.1f}% {boost_share:6.1f}% {rss}"
        )
    print(
        "(times in ms; read = read + decode and prep = preprocess, p50 within the e2e runs; "
        "% peak from the batch-16 model-only rate)"
    )


def session_settings(fp32: Path, int8: Path, prepared: np.ndarray, repeats: int) -> None:
    import onnxruntime as ort

    from covid_cxr.inference.runtime import session_options

    print("\nONNX Runtime session settings, model only (p50 ms per call):")
    print(f"  {'':5}{'setting':34}{'batch 1':>9}{'batch 16':>10}")
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    variants: list[tuple[str, int, str, bool, bool]] = [
        (f"opt={level}, 1 thread{' (used)' if level == 'all' else ''}", 1, level, True, False)
        for level in levels
    ]
    variants += [
        ("opt=all, 2 threads", 2, "all", True, False),
        ("opt=all, 2 threads, spinning", 2, "all", True, True),
        ("opt=all, 2 threads, parallel mode", 2, "all", False, False),
    ]
    batch = np.repeat(prepared, BATCH, axis=0)
    for path, label in ((fp32, "fp32"), (int8, "int8")):
        for name, threads, level, sequential, spinning in variants:
            options = session_options(threads, spinning=spinning)
            options.graph_optimization_level = levels[level]
            if not sequential:
                options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
                options.inter_op_num_threads = 2
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            one = timed(lambda s=session: s.run(["logit"], {"image": prepared}), repeats)
            many = timed(lambda s=session: s.run(["logit"], {"image": batch}), repeats // 6)
            print(f"  {label} {name:34}{percentile(one, 50):9.2f}{percentile(many, 50):10.2f}")


def concurrent(model: Path, image: Path, seconds: float = 4.0) -> None:
    """Two threads share one Predictor, as the web service's pool does."""
    print("\nTwo concurrent requests sharing one Predictor (end-to-end, ONNX):")
    for threads in (1, 2):
        predictor = Predictor(model, threads=threads)
        predictor.predict(image)
        counts = [0, 0]
        stop = time.perf_counter() + seconds

        def work(
            slot: int, predictor: Predictor = predictor, counts: list[int] = counts, stop=stop
        ) -> None:
            while time.perf_counter() < stop:
                predictor.predict(image)
                counts[slot] += 1

        workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(f"  session threads={threads}: {sum(counts) / seconds:6.1f} predictions/s")


def decode_parallelism(model: Path) -> None:
    print("\n`covid-cxr predict` on 64 real radiographs (PNG 448 px + JPEG), batch 16:")
    files = sorted((data_root() / "covid-19-image-repository" / "png").glob("*.png"))[:32]
    files += sorted((data_root() / "kaggle-normal-196").rglob("*.jp*g"))[:32]
    predictor = Predictor(model)
    for workers in (1, 2):
        start = time.perf_counter()
        done = sum(1 for _ in predict_files(predictor, files, batch_size=BATCH, workers=workers))
        rate = done / (time.perf_counter() - start)
        print(f"  {workers} decode thread(s): {rate:6.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a covid-cxr checkpoint (default: see the docstring)")
    parser.add_argument("--image", type=Path, help="default: a 640-pixel JPEG from the datasets")
    parser.add_argument("--threads", type=int, default=1, help="model threads per engine")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    image = args.image or find_jpeg()
    radiograph = read_radiograph(image)
    print(f"load average before: {os.getloadavg()}")
    print(f"image: {image} ({radiograph.format}, {radiograph.width}x{radiograph.height})")
    with tempfile.TemporaryDirectory(prefix="covid-cxr-bench-") as tmp:
        checkpoint, fp32, int8, seed = build_models(args, Path(tmp))
        info = Predictor(fp32).info
        print(f"model: {info.name} {info.version}, preprocess {info.preprocess}")
        flops = onnx_flops(fp32)
        engines: list[tuple[str, Path, float]] = [
            ("PyTorch eager fp32", checkpoint, flops),
            ("ONNX fp32", fp32, flops),
            ("ONNX int8", int8, flops),
        ]
        if DEFAULT_MODEL.is_file():
            engines.append((f"shipped {DEFAULT_MODEL.name}", DEFAULT_MODEL, flops))
        seed_onnx = Path(tmp) / "seed-cnn.onnx"
        from covid_cxr.models.checkpoint import load_checkpoint

        export_onnx(*load_checkpoint(seed), seed_onnx)
        seed_flops = onnx_flops(seed_onnx)
        engines.append(("seed-cnn PyTorch eager fp32", seed, seed_flops))
        engines.append(("seed-cnn ONNX fp32", seed_onnx, seed_flops))
        rows = []
        for name, path, model_flops in engines:
            predictor = Predictor(path, threads=args.threads)
            if "shipped" in name:
                precision = predictor.info.metadata.get("export", {}).get("precision", "?")
                name += f" ({precision})"
            row = measure(name, predictor, image, model_flops, args.repeats)
            row.rss_mib = predictor_mib(path, image, args.threads)
            rows.append(row)
        print_table(rows, args.threads)
        best = min(percentile(r.e2e, 50) for r in rows if "seed" not in r.engine)
        keras = sum(KERAS_MS) / 2
        seed_row = next(r for r in rows if "seed" in r.engine)
        print(
            f"\nvs Keras model.predict ({KERAS_MS[0]:.0f}-{KERAS_MS[1]:.0f} ms): fastest "
            f"end-to-end {best:.2f} ms = {keras / best:.1f}x faster; seed-cnn in PyTorch "
            f"{percentile(seed_row.e2e, 50):.1f} ms = {keras / percentile(seed_row.e2e, 50):.1f}x"
        )
        print(f"goals: e2e < {GOAL_MS} ms, RSS < {GOAL_MIB} MiB")
        torch_mib = resident_mib("import torch")
        print(
            f"memory: a fresh interpreter after `import torch` alone holds {torch_mib:.0f} MiB; "
            "ONNX Predictors never import torch (their RSS above), PyTorch ones do."
        )
        prepared = Predictor(fp32).prepare(image).input[None, None]
        session_settings(fp32, int8, prepared, args.repeats)
        concurrent(int8, image)
        decode_parallelism(int8)
    print(f"\nload average after: {os.getloadavg()}")
    print(f"this process: {psutil.Process().memory_info().rss / 2**20:.0f} MiB resident")


if __name__ == "__main__":
    main()
