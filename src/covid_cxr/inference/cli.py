"""`covid-cxr export` (checkpoint -> ONNX, optionally int8) and `covid-cxr predict` (batch)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from covid_cxr import RESEARCH_NOTICE

PREDICT_EPILOG = f"""\
exit status: 0 every input was predicted; 1 at least one input failed (each failure is
reported on stderr and as a row with an `error` column, and never stops the batch);
2 usage error (bad option, model not found).

{RESEARCH_NOTICE}
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_export(subparsers)
    _register_predict(subparsers)


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    from covid_cxr.inference.quantize import CALIBRATION_METHODS, DEFAULT_METHOD

    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX (optionally int8)",
        description="Export a checkpoint to ONNX with its preprocessing and thresholds in the "
        "metadata, check ONNX Runtime against PyTorch, and optionally quantise to int8 "
        "calibrated on real radiographs, reporting the AUC and accuracy change.",
    )
    parser.add_argument("--model", required=True, help="checkpoint (.pt) or training run folder")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--int8", action="store_true", help="static int8 quantisation")
    parser.add_argument(
        "--calibration", type=Path, help="radiographs to calibrate int8 on: folder or manifest"
    )
    parser.add_argument(
        "--calibration-count", type=_positive, default=200, metavar="N", help="(default 200)"
    )
    parser.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=DEFAULT_METHOD)
    parser.add_argument(
        "--quantize-all",
        action="store_true",
        help="also quantise the final linear layer (kept float by default: it costs accuracy)",
    )
    parser.add_argument(
        "--validate-on",
        type=Path,
        metavar="MANIFEST",
        help="labelled data (manifest: its val split) to measure what int8 changes",
    )
    parser.add_argument("--fp32-out", type=Path, help="with --int8, also keep the fp32 model here")
    parser.add_argument("--workers", type=_positive, default=2, help="decoding threads")
    parser.set_defaults(func=run_export)


def _register_predict(subparsers: argparse._SubParsersAction) -> None:
    from covid_cxr.audit.cli import add_audit_options
    from covid_cxr.inference.writers import FORMATS

    parser = subparsers.add_parser(
        "predict",
        help="predict COVID-19 on radiograph files, folders or globs",
        description="Predict COVID-19 on PNG, JPEG and DICOM radiographs.\n"
        "Folders are searched recursively; quote globs (e.g. 'scans/**/*.dcm').\n"
        "Without --model, uses $COVID_CXR_MODEL or the shipped default model.",
        epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--model", help="checkpoint (.pt), run folder or .onnx file")
    parser.add_argument(
        "--format", choices=FORMATS, help="default: from --output's suffix, else table"
    )
    parser.add_argument("--output", type=Path, help="write rows here instead of stdout")
    parser.add_argument("--cam", type=Path, metavar="DIR", help="write Grad-CAM overlays here")
    parser.add_argument(
        "--batch-size", type=_positive, default=16, help="images per model call (default 16)"
    )
    parser.add_argument("--workers", type=_positive, default=2, help="decoding threads")
    parser.add_argument("--threads", type=_positive, help="model threads (ONNX default 1)")
    parser.add_argument("--operating-point", help="a named threshold of the model")
    add_audit_options(parser)
    parser.set_defaults(func=run_predict)


def run_export(args: argparse.Namespace) -> int:
    from covid_cxr.inference.export import export_model

    export_model(
        args.model,
        args.out,
        int8=args.int8,
        calibration=args.calibration,
        calibration_count=args.calibration_count,
        method=args.calibration_method,
        float_head=not args.quantize_all,
        validate_on=args.validate_on,
        fp32_out=args.fp32_out,
        workers=args.workers,
    )
    return 0


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = args.output.suffix.lower() if args.output else ""
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "table")


def _cam_file(folder: Path, source: Path, used: set[str]) -> Path:
    name, n = f"{source.stem}.cam.png", 1
    while name in used:
        n += 1
        name = f"{source.stem}.{n}.cam.png"
    used.add(name)
    return folder / name


def run_predict(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from covid_cxr.audit.capture import CliTrail
    from covid_cxr.audit.cli import audit_url
    from covid_cxr.errors import DataError, ModelError
    from covid_cxr.explain.gradcam import overlay
    from covid_cxr.inference.batch import Failure, gather, predict_files
    from covid_cxr.inference.predictor import Predictor
    from covid_cxr.inference.writers import RowWriter, record

    fmt = _output_format(args)
    predictor = Predictor(args.model, threads=args.threads, operating_point=args.operating_point)
    if args.cam and not predictor.cam_available:
        raise ModelError(predictor.runtime.cam_unavailable or "Grad-CAM unavailable")
    inputs = gather(args.paths)
    if not inputs.files and not inputs.failures:
        raise DataError(f"no radiographs found in {' '.join(args.paths)}")
    trail = CliTrail(audit_url(args), predictor)  # each input is recorded before its row
    if args.cam:
        args.cam.mkdir(parents=True, exist_ok=True)
    stream = args.output.open("w", encoding="utf-8", newline="") if args.output else sys.stdout
    notice_stream = stream if fmt == "table" else sys.stderr
    print(f"{RESEARCH_NOTICE}\nmodel: {predictor!r}", file=notice_stream)
    writer = RowWriter(stream, fmt, with_cam=args.cam is not None)
    failed = predicted = 0
    used_names: set[str] = set()
    start = time.perf_counter()
    # Rows on the terminal are their own progress display; elsewhere show a bar on stderr.
    bar = tqdm(
        total=len(inputs.files),
        unit="img",
        desc="predicting",
        disable=True if stream is sys.stdout and sys.stdout.isatty() else None,
    )
    try:
        for failure in inputs.failures:
            print(f"covid-cxr predict: {failure.source}: {failure.reason}", file=sys.stderr)
            trail.record(failure.source, failure)
            writer.write(record(failure.source, failure, None))
            failed += 1
        results = predict_files(
            predictor,
            inputs.files,
            batch_size=args.batch_size,
            workers=args.workers,
            cam=args.cam is not None,
        )
        for path, result in results:
            cam_path = None
            if isinstance(result, Failure):
                bar.write(f"covid-cxr predict: {path}: {result.reason}", file=sys.stderr)
                failed += 1
            else:
                predicted += 1
                if args.cam is not None and result.cam is not None:
                    cam_file = _cam_file(args.cam, path, used_names)
                    crop = predictor.info.preprocess.crop
                    Image.fromarray(overlay(result.radiograph.pixels, result.cam, crop=crop)).save(
                        cam_file
                    )
                    cam_path = str(cam_file)
            trail.record(path, result)
            writer.write(record(str(path), result, cam_path))
            bar.update()
    finally:
        bar.close()
        trail.close()
        if stream is not sys.stdout:
            stream.close()
    elapsed = time.perf_counter() - start
    summary = f"{predicted} predicted, {failed} failed"
    if inputs.skipped:
        summary += f", {inputs.skipped} non-image file(s) in folders ignored"
    rate = predicted / elapsed if elapsed > 0 else 0.0
    print(f"{summary} in {elapsed:.1f} s ({rate:.1f} images/s)", file=sys.stderr)
    if fmt != "table" or args.output:
        print(RESEARCH_NOTICE, file=sys.stderr)
    return 1 if failed else 0
