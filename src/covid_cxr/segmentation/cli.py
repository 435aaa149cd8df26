"""`covid-cxr segment` (lung masks for radiographs) and `covid-cxr segment-evaluate` (Dice
report on a lung-mask manifest). Neither imports torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.cliargs import positive_int

SEGMENT_EPILOG = f"""\
writes DIR/<stem>.png per input: 8-bit, 255 = lung, the input's own size (and with --overlay
DIR/<stem>.overlay.png: the radiograph with the lungs tinted and outlined); inputs whose stems
clash get <stem>.2.png, ...

exit status: 0 every input was segmented; 1 at least one input failed (each failure is
reported on stderr with its reason, and never stops the batch); 2 usage error.

{RESEARCH_NOTICE}
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="lung masks for radiograph files, folders or globs",
        description="Segment the lungs on PNG, JPEG and DICOM radiographs. Folders are searched "
        "recursively; quote globs. Without --model, uses the shipped covid-cxr-lungs.onnx.",
        epilog=SEGMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--overlay", action="store_true", help="also write overlay pictures")
    parser.add_argument("--model", type=Path, help="segmenter .onnx (default: the shipped one)")
    parser.add_argument("--workers", type=positive_int, default=2, help="parallel images")
    parser.add_argument("--threads", type=positive_int, help="model threads per image (default 1)")
    parser.set_defaults(func=run_segment)

    evaluate = subparsers.add_parser(
        "segment-evaluate",
        help="Dice of a lung segmenter on a lung-mask manifest, with a report",
        description="Dice per image at the radiograph's own size (post-processed masks) on one "
        "split of a mask manifest (covid-cxr data masks), mean per source with 95% bootstrap "
        "CIs resampling patients; writes report.md, report.html, metrics.json and dice.png.",
    )
    evaluate.add_argument("--model", type=Path, help="segmenter .onnx (default: the shipped one)")
    evaluate.add_argument("--data", type=Path, default=Path("data/lungs/manifest.csv"))
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--out", type=Path, required=True, help="report folder")
    evaluate.add_argument("--resamples", type=positive_int, default=2000)
    evaluate.add_argument("--workers", type=positive_int, default=2)
    evaluate.set_defaults(func=run_evaluate)


def _unique(folder: Path, stem: str, suffix: str, used: set[str]) -> Path:
    name, n = f"{stem}{suffix}", 1
    while name in used:
        n += 1
        name = f"{stem}.{n}{suffix}"
    used.add(name)
    return folder / name


def _save_png(path: Path, array: object) -> None:
    from PIL import Image

    from covid_cxr.fileio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # type: ignore[arg-type]


def run_segment(args: argparse.Namespace) -> int:
    from covid_cxr.errors import DataError, failure_reason
    from covid_cxr.imaging import read_radiograph
    from covid_cxr.inference.batch import gather, map_ordered
    from covid_cxr.segmentation.masks import LungMask, overlay
    from covid_cxr.segmentation.segmenter import LungSegmenter

    segmenter = LungSegmenter(args.model, threads=args.threads)
    inputs = gather([str(p) for p in args.paths])
    if not inputs.files and not inputs.failures:
        raise DataError(f"no radiographs found in {' '.join(map(str, args.paths))}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{RESEARCH_NOTICE}\nmodel: {segmenter!r}", file=sys.stderr)

    def work(path: Path) -> tuple[object, LungMask]:
        radiograph = read_radiograph(path)
        return radiograph, segmenter.segment(radiograph)

    failed = [(f.source, f.reason) for f in inputs.failures]
    done, used = 0, set[str]()
    for path, result in map_ordered(work, inputs.files, workers=args.workers, ahead=8):
        if isinstance(result, BaseException):
            failed.append((str(path), failure_reason(result)))
            print(f"covid-cxr segment: {path}: {failed[-1][1]}", file=sys.stderr)
            continue
        radiograph, lungs = result  # type: ignore[misc]
        target = _unique(args.out, path.stem, ".png", used)
        _save_png(target, lungs.to_png_array())
        if args.overlay:
            picture = overlay(radiograph.pixels, lungs.mask)  # type: ignore[attr-defined]
            _save_png(_unique(args.out, path.stem, ".overlay.png", used), picture)
        done += 1
        print(
            f"{path} -> {target}: lungs {lungs.area_fraction:.1%} of the image, "
            f"{lungs.components} component(s)"
        )
    for source, reason in failed[: len(inputs.failures)]:
        print(f"covid-cxr segment: {source}: {reason}", file=sys.stderr)
    summary = f"{done} segmented, {len(failed)} failed"
    if inputs.skipped:
        summary += f", {inputs.skipped} non-image file(s) in folders ignored"
    print(summary, file=sys.stderr)
    return 1 if failed else 0


def run_evaluate(args: argparse.Namespace) -> int:
    from covid_cxr.segmentation.evaluate import evaluate_segmenter, write_report

    evaluation = evaluate_segmenter(
        args.model, args.data, split=args.split, workers=args.workers, resamples=args.resamples
    )
    paths = write_report(evaluation, args.out)
    for row in evaluation.summaries:
        print(f"{row.source}: Dice {row.mean:.4f} ({row.ci_low:.4f}-{row.ci_high:.4f}), n={row.n}")
    print(f"report: {paths[0]}")
    return 1 if evaluation.failures else 0
