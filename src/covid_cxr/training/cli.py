"""`covid-cxr train --config configs/train/NAME.toml [--resume CKPT] [--out DIR] ...`

Runs as is under `torchrun --nnodes N --nproc_per_node M -m covid_cxr.cli train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from covid_cxr.cliargs import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a manifest",
        description="Train a model; writes runs/<name>/ (config.toml, history.csv/png, best.pt, "
        "last.pt, metrics.json). Also runs under torchrun for several processes or machines.",
    )
    parser.add_argument("--config", required=True, type=Path, help="configs/train/NAME.toml")
    parser.add_argument("--resume", type=Path, help="continue from a run's last.pt")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument("--epochs", type=positive_int, help="override the config's epochs")
    parser.add_argument(
        "--max-images", type=positive_int, help="use at most N images per split (a quick run)"
    )
    parser.add_argument("--manifest", type=Path, help="override the config's manifest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covid_cxr.config import TrainConfig, load_config
    from covid_cxr.training.trainer import Trainer

    config = load_config(args.config, TrainConfig)
    changes: dict[str, object] = {}
    if args.epochs:
        changes["epochs"] = args.epochs
    if args.max_images:
        changes["max_images"] = args.max_images
    if args.manifest:
        changes["manifest"] = str(args.manifest)
    config = dataclasses.replace(config, **changes)
    out = args.out or Path("runs") / config.name
    Trainer(config, out, resume=args.resume, progress=not args.no_progress).run()
    return 0
