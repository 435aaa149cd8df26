"""`covid-cxr evaluate`: honest metrics, operating points, figures and a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_cxr.cliargs import count, fraction

SPLIT_CHOICES = ("train", "val", "test", "external", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model: metrics with confidence intervals, operating points, report",
        description=(
            "Score a model on labelled radiographs and write metrics.json, report.md, "
            "report.html and PNG figures. Thresholds other than 0.5 are chosen on validation "
            "data (the manifest's val split or --threshold-from); inference and the service "
            "use the model's stored operating point (ModelInfo.threshold), which "
            "--store-thresholds updates."
        ),
    )
    parser.add_argument(
        "--model",
        help="checkpoint (.pt), training run folder (its best.pt) or ONNX file "
        "(default: $COVID_CXR_MODEL, else the shipped model)",
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="manifest CSV, labelled CSV (path,label[,patient_id,source]) or a folder with one "
        "sub-folder per class",
    )
    parser.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        help="manifest split to evaluate (default: test when the data has one, else all rows)",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: evaluation/<data>-<split>)"
    )
    parser.add_argument(
        "--threshold-from",
        type=Path,
        metavar="VAL_DATA",
        help="labelled data to choose thresholds on (its val split if it is a manifest with "
        "one); default: the val split of --data, else the thresholds stored in the model",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=fraction,
        default=0.95,
        help="sensitivity the 'sensitivity_NN' operating point must reach on validation data",
    )
    parser.add_argument(
        "--bootstrap",
        type=count,
        default=1000,
        metavar="N",
        help="bootstrap resamples (0: no CIs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--cam-errors",
        type=count,
        default=12,
        metavar="N",
        help="most confident errors to show with their Grad-CAM maps",
    )
    parser.add_argument(
        "--store-thresholds",
        action="store_true",
        help="write the chosen thresholds into the model file (checkpoint or ONNX)",
    )
    parser.add_argument(
        "--operating-point",
        metavar="NAME",
        help="operating point that becomes the model's default with --store-thresholds and "
        "is used for the confusion matrix and error grid (default, youden, sensitivity_95, "
        "...; default: the model's current one)",
    )
    parser.add_argument(
        "--no-cam-in-lungs",
        dest="cam_in_lungs",
        action="store_false",
        help="skip measuring the share of Grad-CAM mass inside the lungs (it segments every "
        "image with the shipped lung segmenter, about 30-60 ms each)",
    )
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        help="model threads (default: 1 per ONNX session; PyTorch keeps its own default)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covid_cxr import RESEARCH_NOTICE
    from covid_cxr.evaluation.evaluate import EvaluateOptions, evaluate, write_outputs
    from covid_cxr.evaluation.result import StoredThresholds
    from covid_cxr.evaluation.store import store_thresholds
    from covid_cxr.inference.predictor import resolve_model_path

    out = args.out or Path("evaluation") / f"{args.data.stem}-{args.split or 'auto'}"
    model = resolve_model_path(args.model)
    result = evaluate(
        EvaluateOptions(
            model=model,
            data=args.data,
            out=out,
            split=args.split,
            threshold_from=args.threshold_from,
            resamples=args.bootstrap,
            seed=args.seed,
            target_sensitivity=args.target_sensitivity,
            cam_errors=args.cam_errors,
            store=args.store_thresholds,
            operating_point=args.operating_point,
            workers=args.workers,
            batch_size=args.batch_size,
            threads=args.threads,
            cam_in_lungs=args.cam_in_lungs,
        )
    )
    if args.store_thresholds:
        thresholds = {op: point.threshold for op, point in result.operating_points.items()}
        info = store_thresholds(model, thresholds, result.primary_operating_point)
        result.stored = StoredThresholds(result.model.path, info.thresholds, info.operating_point)
    write_outputs(result, out)
    data, at = result.data, result.at_primary
    print(
        f"{data.scored}/{data.listed} images scored, {len(data.unreadable)} unreadable, "
        f"{len(data.excluded_by_reader)} left out by the data reader"
    )
    print(f"ROC-AUC {result.overall.scores['roc_auc']}")
    for name in ("sensitivity", "specificity"):
        print(
            f"{name} at {result.primary_operating_point} (t={at.threshold:.3g}): {at.metrics[name]}"
        )
    if "all" in result.cam_in_lungs:
        print(f"Grad-CAM mass inside the lungs: {result.cam_in_lungs['all']}")
    if result.stored:
        stored = result.stored
        print(
            f"stored thresholds {stored.thresholds} in {stored.path} "
            f"(operating point: {stored.operating_point})"
        )
    print(f"report: {out / 'report.html'} (and report.md, metrics.json, PNG figures)")
    print(RESEARCH_NOTICE)
    return 0
