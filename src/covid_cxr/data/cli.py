"""`covid-cxr data build`: combine public and user sources into a manifest with a patient split."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from covid_cxr.config import DataRecipe, SourceSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build datasets (manifest + patient-level split)")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = commands.add_parser(
        "build",
        help="combine sources into a manifest CSV with a patient-level split and a report",
        description="Read the sources of a recipe (configs/data/*.toml) and/or --source options, "
        "decode every image once, drop unreadable files and exact duplicates, group patients "
        "with their near-duplicate images and split whole groups. Writes manifest.csv, "
        "report.json and report.md to --out.",
    )
    build.add_argument("--recipe", type=Path, help="TOML recipe, e.g. configs/data/default.toml")
    build.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="KIND:PATH",
        help="add a source (kinds: ieee8023, kaggle-pneumonia, nih, hannover, folder, csv); "
        "PATH relative to the data root unless absolute",
    )
    build.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="KIND:PATH",
        help="add a held-out source: all its images go to split 'external'",
    )
    build.add_argument("--data-root", type=Path, help="datasets folder (default: $COVID_CXR_DATA)")
    build.add_argument("--out", type=Path, help="output folder (default: data/<recipe name>)")
    build.add_argument("--seed", type=int, help="override the recipe's split seed")
    build.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    build.add_argument(
        "--export-folders",
        type=Path,
        metavar="DIR",
        help="also copy images into DIR/Dataset/Train|Validation|Test/<label>/",
    )
    build.add_argument(
        "--no-cache", action="store_true", help="decode every image again (ignore the cache)"
    )
    build.set_defaults(func=run)


def _parse_source(text: str, holdout: bool) -> SourceSpec:
    from covid_cxr.config import SourceSpec
    from covid_cxr.errors import ConfigError

    kind, sep, path = text.partition(":")
    if not sep or not kind or not path:
        raise ConfigError(f"--source {text!r}: expected KIND:PATH, e.g. folder:/data/my-hospital")
    return SourceSpec(kind=kind, path=path, holdout=holdout)


def recipe_from_args(args: argparse.Namespace) -> DataRecipe:
    """The recipe file plus any --source/--external, with --seed applied."""
    from covid_cxr.config import DataRecipe, load_config
    from covid_cxr.errors import ConfigError

    extra = [_parse_source(text, False) for text in args.source]
    extra += [_parse_source(text, True) for text in args.external]
    if args.recipe:
        recipe = load_config(args.recipe, DataRecipe)
        recipe = dataclasses.replace(recipe, sources=[*recipe.sources, *extra])
    elif extra:
        recipe = DataRecipe(name="custom", sources=extra)
    else:
        raise ConfigError("give a --recipe (e.g. configs/data/default.toml) or --source KIND:PATH")
    if args.seed is not None:
        split = dataclasses.replace(recipe.split, seed=args.seed)
        recipe = dataclasses.replace(recipe, split=split)
    return recipe


def run(args: argparse.Namespace) -> int:
    from covid_cxr.data.build import build_dataset
    from covid_cxr.data.fingerprint import CACHE_NAME
    from covid_cxr.data.keras_folders import export_folders
    from covid_cxr.data.report import print_summary, write_outputs
    from covid_cxr.paths import data_root

    recipe = recipe_from_args(args)
    root = args.data_root or data_root()
    out = args.out or Path("data") / recipe.name
    result = build_dataset(
        recipe,
        data_root=root,
        workers=args.workers,
        cache_file=None if args.no_cache else out / CACHE_NAME,
    )
    paths = write_outputs(result, out)
    print_summary(result, out)
    print(f"report: {paths['markdown']} and {paths['json']}")
    if args.data_root and args.data_root.resolve() != data_root().resolve():
        print(f"note: manifest paths are relative to {root}; set COVID_CXR_DATA={root} to use it")
    if args.export_folders:
        counts = export_folders(result.rows, args.export_folders)
        listing = ", ".join(f"{folder}: {n}" for folder, n in sorted(counts.items()))
        print(f"exported to {args.export_folders / 'Dataset'} ({listing})")
    return 0
