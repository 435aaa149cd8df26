"""`covid-cxr export` (checkpoint -> ONNX, optionally int8) and `covid-cxr predict` (batch)."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.cliargs import positive_int
from covid_cxr.service.settings import ServiceSettings

if TYPE_CHECKING:
    from tqdm import tqdm

    from covid_cxr.audit.capture import CliTrail
    from covid_cxr.inference.batch import Failure, Inputs
    from covid_cxr.inference.predictor import Prediction, Predictor
    from covid_cxr.inference.writers import Format, RowWriter

MAX_FILE_MB = 64.0
DEFAULT_MAX_PIXELS = ServiceSettings.max_pixels

OUT_OF_SCOPE = "out of scope"

PREDICT_EPILOG = f"""\
input gate: an image that is not a frontal chest radiograph (by its DICOM header or its
pixels) gets no probability but a row with error "out of scope: ..." and counts as failed.
--no-gate (or COVID_CXR_GATE=off) bypasses it, for research only.

output: without --output, rows stream to stdout as they are predicted. With --output FILE,
rows stream to .FILE.partial beside it (follow it with `tail -f`) and FILE is replaced only
when the run completes: an interrupted or killed run never truncates an earlier FILE. Rerun
with --resume to keep the predicted rows of FILE and of a killed run's .FILE.partial, and to
predict only the rest (failed rows are tried again); resumed rows come first.

skipped inputs: inside folders, files with other extensions are ignored (counted in the
summary); hidden files are not searched. Unreadable folders and files, symbolic link loops,
dangling links, named pipes, sockets and devices become rows with the reason (pipes are never
opened). A file larger than --max-file-mb, or whose header claims more than --max-pixels
pixels, is refused before it is decoded.

exit status: 0 every input was predicted; 1 at least one input failed (each failure is
reported on stderr and as a row with an `error` column, and never stops the batch);
2 usage error (bad option, model not found, --resume without a csv/jsonl --output).

{RESEARCH_NOTICE}
"""


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
        "--calibration-count", type=positive_int, default=200, metavar="N", help="(default 200)"
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
    parser.add_argument("--workers", type=positive_int, default=2, help="decoding threads")
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
    parser.add_argument(
        "--output", type=Path, help="write rows here instead of stdout (replaced at the end)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the predicted rows of --output (csv/jsonl) and of a killed run; "
        "predict only the other inputs",
    )
    parser.add_argument("--cam", type=Path, metavar="DIR", help="write Grad-CAM overlays here")
    parser.add_argument(
        "--dicom-out",
        type=Path,
        metavar="DIR",
        help="write DICOM results here: <stem>.sr.dcm (Structured Report) and <stem>.sc.dcm "
        "(Grad-CAM Secondary Capture), in the input's study (PNG/JPEG inputs: a new study)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per model call (default 16)"
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="decoding threads")
    parser.add_argument("--threads", type=positive_int, help="model threads (ONNX default 1)")
    parser.add_argument("--operating-point", help="a named threshold of the model")
    parser.add_argument(
        "--max-file-mb",
        type=float,
        default=MAX_FILE_MB,
        metavar="MB",
        help=f"refuse larger files from their size, unread (default {MAX_FILE_MB:g}: an "
        "uncompressed 16-bit DICOM from the largest detectors is ~40 MB)",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images whose header claims more (default {DEFAULT_MAX_PIXELS:,}, as "
        "`covid-cxr serve`)",
    )
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="research only: score every image, even ones the input gate would refuse",
    )
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


def _output_format(args: argparse.Namespace) -> Format:
    if args.format:
        return args.format
    suffix = args.output.suffix.lower() if args.output else ""
    formats: dict[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
    return formats.get(suffix, "table")


def _cam_file(folder: Path, source: Path, used: set[str]) -> Path:
    name, n = f"{source.stem}.cam.png", 1
    while name in used:
        n += 1
        name = f"{source.stem}.{n}.cam.png"
    used.add(name)
    return folder / name


def _dicom_results(
    folder: Path, predictor: Predictor, path: Path, result: Prediction, used: set[str], bar: tqdm
) -> bool:
    """Write the SR and SC of one prediction (`--dicom-out`); False (reported) on failure."""
    from covid_cxr.dicom import build_results, write_results
    from covid_cxr.errors import RadiographError
    from covid_cxr.explain.gradcam import overlay

    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}.{n}"
    used.add(stem)
    assert result.cam is not None  # predicted with cam=True
    crop = predictor.info.preprocess.crop
    rgb = overlay(result.radiograph.pixels, result.cam, crop=crop, box=result.box)
    try:
        results = build_results(
            result.radiograph,
            result,
            rgb,
            predictor.info,
            operating_point=predictor.operating_point,
        )
    except RadiographError as exc:
        bar.write(f"covid-cxr predict: {path}: no DICOM results: {exc}", file=sys.stderr)
        return False
    write_results(results, folder, stem)
    return True


@dataclass
class _Tally:
    predicted: int = 0
    failed: int = 0
    resumed: int = 0
    out_of_scope: int = 0


def _predictor(args: argparse.Namespace) -> Predictor:
    from covid_cxr.errors import ModelError
    from covid_cxr.inference.predictor import Predictor

    predictor = Predictor(
        args.model,
        threads=args.threads,
        operating_point=args.operating_point,
        gate=False if args.no_gate else None,
    )
    if (args.cam or args.dicom_out) and not predictor.cam_available:
        raise ModelError(predictor.runtime.cam_unavailable or "Grad-CAM unavailable")
    return predictor


def _kept_rows(args: argparse.Namespace, fmt: Format, inputs: Inputs) -> dict[str, dict]:
    """With --resume, the earlier rows of inputs predicted then, by path (and --output checked
    before any work: a folder or a --resume without csv/jsonl output is a usage error)."""
    from covid_cxr.errors import ConfigError
    from covid_cxr.inference.writers import previous_rows

    if args.output is not None and args.output.is_dir():
        raise ConfigError(f"--output {args.output} is a folder; name the file to write")
    if not args.resume:
        return {}
    if args.output is None or fmt not in ("csv", "jsonl"):
        raise ConfigError("--resume needs --output with --format csv or jsonl")
    wanted = {str(path) for path in inputs.files}
    kept = {}
    for row in previous_rows(args.output, fmt):
        if row.get("path") in wanted:
            if row.get("error") is None:
                kept[str(row["path"])] = row
            else:  # a failure earlier: try again
                kept.pop(str(row["path"]), None)
    return kept


def _write_failures(writer: RowWriter, failures: list[Failure], bar: tqdm, trail: CliTrail) -> int:
    from covid_cxr.inference.writers import record

    for failure in failures:
        bar.write(f"covid-cxr predict: {failure.source}: {failure.reason}", file=sys.stderr)
        trail.record(failure.source, failure)
        writer.write(record(failure.source, failure, None))
    return len(failures)


def _save_cam(
    args: argparse.Namespace, predictor: Predictor, path: Path, result: Prediction, used: set[str]
) -> str | None:
    from PIL import Image

    from covid_cxr.explain.gradcam import overlay

    if args.cam is None or result.cam is None:
        return None
    cam_file = _cam_file(args.cam, path, used)
    crop = predictor.info.preprocess.crop
    rgb = overlay(result.radiograph.pixels, result.cam, crop=crop, box=result.box)
    Image.fromarray(rgb).save(cam_file)
    return str(cam_file)


def _predict_rows(
    args: argparse.Namespace,
    predictor: Predictor,
    files: list[Path],
    writer: RowWriter,
    tally: _Tally,
    bar: tqdm,
    trail: CliTrail,
) -> None:
    """Predict `files`, recording each in the audit trail and then writing its row."""
    from covid_cxr.inference.batch import Failure, Limits, predict_files
    from covid_cxr.inference.writers import record

    limits = Limits(max_bytes=int(args.max_file_mb * 2**20), max_pixels=args.max_pixels)
    used_names: set[str] = set()
    used_dicom: set[str] = set()
    results = predict_files(
        predictor,
        files,
        batch_size=args.batch_size,
        workers=args.workers,
        cam=args.cam is not None or args.dicom_out is not None,
        limits=limits,
    )
    for path, result in results:
        cam_path = None
        if isinstance(result, Failure):
            bar.write(f"covid-cxr predict: {path}: {result.reason}", file=sys.stderr)
            tally.failed += 1
            tally.out_of_scope += result.reason.startswith(OUT_OF_SCOPE)
        else:
            tally.predicted += 1
            for warning in result.warnings:
                bar.write(f"covid-cxr predict: {path}: warning: {warning}", file=sys.stderr)
            cam_path = _save_cam(args, predictor, path, result, used_names)
            if args.dicom_out is not None and not _dicom_results(
                args.dicom_out, predictor, path, result, used_dicom, bar
            ):
                tally.failed += 1
        trail.record(path, result)  # before its row: a reported result is always recorded
        writer.write(record(str(path), result, cam_path))
        bar.update()


def _rows_to(args: argparse.Namespace, fmt: Format, kept: list[dict]) -> AbstractContextManager:
    """Where rows go: a RowFile for --output, else a RowWriter on stdout."""
    from covid_cxr.inference.writers import RowFile, RowWriter

    if args.output is not None:
        return RowFile(args.output, fmt, kept, with_cam=args.cam is not None)
    return nullcontext(RowWriter(sys.stdout, fmt, with_cam=args.cam is not None))


def _summary(tally: _Tally, inputs: Inputs, elapsed: float) -> str:
    summary = f"{tally.predicted} predicted, {tally.failed} failed"
    if tally.out_of_scope:
        summary += f" ({tally.out_of_scope} out of scope: not frontal chest radiographs)"
    if tally.resumed:
        summary += f", {tally.resumed} kept from the earlier output (--resume)"
    if inputs.skipped:
        summary += f", {inputs.skipped} non-image file(s) in folders ignored"
    rate = tally.predicted / elapsed if elapsed > 0 else 0.0
    return f"{summary} in {elapsed:.1f} s ({rate:.1f} images/s)"


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from covid_cxr.audit.capture import CliTrail
    from covid_cxr.audit.cli import audit_url
    from covid_cxr.errors import DataError
    from covid_cxr.inference.batch import gather
    from covid_cxr.inference.writers import partial_path

    fmt = _output_format(args)
    predictor = _predictor(args)
    inputs = gather(args.paths)
    if not inputs.files and not inputs.failures:
        raise DataError(f"no radiographs found in {' '.join(args.paths)}")
    kept = _kept_rows(args, fmt, inputs)
    trail = CliTrail(audit_url(args), predictor)
    todo = [path for path in inputs.files if str(path) not in kept]
    if args.cam:
        args.cam.mkdir(parents=True, exist_ok=True)
    tally = _Tally(resumed=len(kept))
    start = time.perf_counter()
    to_terminal = args.output is None and sys.stdout.isatty()
    # Rows on the terminal are their own progress display; elsewhere show a bar on stderr.
    bar = tqdm(
        total=len(todo), unit="img", desc="predicting", disable=True if to_terminal else None
    )
    try:
        with _rows_to(args, fmt, list(kept.values())) as writer:
            notice = writer.stream if fmt == "table" else sys.stderr
            print(f"{RESEARCH_NOTICE}\nmodel: {predictor!r}", file=notice)
            tally.failed += _write_failures(writer, inputs.failures, bar, trail)
            _predict_rows(args, predictor, todo, writer, tally, bar, trail)
    except KeyboardInterrupt:
        if args.output is not None:
            partial = partial_path(args.output)
            print(
                f"covid-cxr predict: interrupted; the rows so far are in {partial}, "
                "rerun with --resume to continue",
                file=sys.stderr,
            )
        raise
    finally:
        bar.close()
        trail.close()
    print(_summary(tally, inputs, time.perf_counter() - start), file=sys.stderr)
    if fmt != "table" or args.output:
        print(RESEARCH_NOTICE, file=sys.stderr)
    return 1 if tally.failed else 0
