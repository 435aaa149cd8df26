"""`covid-cxr adapt`: tune a model to a hospital from a few of its labelled radiographs."""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_cxr.cliargs import positive_int

ADAPT_EXTRA = ("onnx", "threadpoolctl")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="tune a model to your hospital from 20-100 of its labelled radiographs",
        description=(
            "Refit the model's final layer on your site's labelled radiographs (frozen ONNX "
            "features, numpy only), compare it with the base model by cross-validation by "
            "patient, choose the site's threshold from cross-validated predictions, and write an "
            "ordinary ONNX model for predict, evaluate and serve. When the refit does not beat "
            "the base model in cross-validation, the base head is kept and only the site "
            "threshold is written."
        ),
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="labelled radiographs: a folder with one sub-folder per class, or a "
        "path,label[,patient_id] CSV (at least 10 of each class; about 50 is better)",
    )
    parser.add_argument("--out", required=True, type=Path, help="the adapted model (.onnx)")
    parser.add_argument(
        "--model",
        help="base ONNX model (default: $COVID_CXR_MODEL, else the shipped model)",
    )
    parser.add_argument("--site", help="site name recorded in the model (default: data's name)")
    parser.add_argument(
        "--operating-point",
        default="youden",
        metavar="POINT",
        help="threshold rule for the site: youden or sensitivity-0.90 (any target)",
    )
    parser.add_argument(
        "--method",
        choices=("logistic", "threshold"),
        default="logistic",
        help="logistic: refit the final layer (kept only if it wins in cross-validation); "
        "threshold: keep the base head, set only the site threshold",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="cross-validation repeats (default 5)"
    )
    parser.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=positive_int, default=2, help="image decoding threads")
    parser.add_argument("--threads", type=positive_int, default=2, help="model threads")
    parser.set_defaults(func=run)


def _check_extras() -> None:
    """The packages of the `adapt` extra, which the base install (predict, serve) leaves out."""
    import importlib.util

    from covid_cxr.errors import ConfigError

    missing = [name for name in ADAPT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"covid-cxr adapt needs {' and '.join(missing)}, not in the base install: "
            "pip install 'covid-cxr[adapt]'"
        )


def run(args: argparse.Namespace) -> int:
    from covid_cxr.errors import ConfigError

    if args.out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out must name an .onnx file, got {args.out}")
    _check_extras()
    from covid_cxr import RESEARCH_NOTICE
    from covid_cxr.adaptation.adapt import AdaptOptions, adapt

    result = adapt(
        AdaptOptions(
            data=args.data,
            out=args.out,
            model=args.model,
            site=args.site,
            operating_point=args.operating_point,
            method=args.method,
            repeats=args.repeats,
            resamples=args.bootstrap,
            seed=args.seed,
            workers=args.workers,
            threads=args.threads,
        )
    )
    counts = result.counts
    print(
        f"site {result.site}: {counts['covid']} COVID-19 and {counts['non_covid']} non-COVID "
        f"radiographs from {counts['patients']} patients"
    )
    for item in result.excluded:
        print(f"  left out: {item.item}: {item.reason}")
    for failure in result.failures:
        print(f"  unreadable: {failure.source}: {failure.reason}")
    info = result.info
    print(f"cross-validated by patient (95% CIs), at {info.operating_point} thresholds:")
    rows = [("base model", result.fit.base), ("adapted", result.fit.adapted)]
    for label, figures in rows:
        if figures is not None:
            print(
                f"  {label:<11} ROC-AUC {figures.roc_auc}  sensitivity {figures.sensitivity}  "
                f"specificity {figures.specificity}"
            )
    print(result.fit.verdict)
    print(
        f"wrote {result.out} (version {info.version}, threshold {info.threshold:.3g} "
        f"[{info.operating_point}]) in {result.seconds:.1f} s"
    )
    print(RESEARCH_NOTICE)
    return 0
