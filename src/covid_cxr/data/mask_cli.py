"""`covid-cxr data masks`: the lung-mask manifest (JSRT, OpenIST, ieee8023) with a patient split."""

from __future__ import annotations

import argparse
from pathlib import Path


def register_masks(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "masks",
        help="lung-mask manifest (image,mask,source,patient_id,split) for segmentation",
        description="Read the JSRT, OpenIST and ieee8023 lung masks, refuse pairs that cannot be "
        "used (unreadable, mask size differs from the image, empty mask) with their reason, "
        "group same-patient and near-duplicate images, and split whole groups 70/15/15. Writes "
        "the manifest and, beside it, excluded.csv.",
    )
    parser.add_argument("--out", type=Path, default=Path("data/lungs/manifest.csv"))
    parser.add_argument("--data-root", type=Path, help="datasets folder (default: $COVID_CXR_DATA)")
    parser.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    parser.set_defaults(func=run_masks)


def run_masks(args: argparse.Namespace) -> int:
    from collections import Counter

    from covid_cxr.config import SplitConfig
    from covid_cxr.data.manifest import shown_path
    from covid_cxr.data.masks import (
        read_mask_sources,
        split_masks,
        write_exclusions,
        write_mask_manifest,
    )
    from covid_cxr.paths import data_root

    root = args.data_root or data_root()
    masks = read_mask_sources(root)
    records = split_masks(masks, SplitConfig(seed=args.seed))
    write_mask_manifest(args.out, records, root)
    excluded = write_exclusions(args.out.parent / "excluded.csv", masks.excluded)
    counts = Counter((r.source, r.split) for r in records)
    for source in sorted({r.source for r in records}):
        split = ", ".join(f"{s} {counts[source, s]}" for s in ("train", "val", "test"))
        print(f"{source}: {split}")
    for a, b, distance in masks.near_duplicates:
        shown = f"{shown_path(a)} ~ {shown_path(b)}"
        print(f"near duplicates (distance {distance}, kept in one split): {shown}")
    for item in masks.excluded:
        print(f"left out: {item.source}: {item.item}: {item.reason}")
    print(
        f"{len(records)} mask pairs written to {args.out}; {len(masks.excluded)} left out "
        f"(listed in {excluded})"
    )
    return 0
