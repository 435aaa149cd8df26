"""What a build produced and what it left out: the summary table, report.json and report.md."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from covid_cxr.config import to_dict
from covid_cxr.data.build import BuildResult
from covid_cxr.data.manifest import SPLITS, write_manifest
from covid_cxr.data.sources import BALANCING, NOT_SELECTED

MANIFEST_NAME = "manifest.csv"
# Deliberate choices of the recipe, listed in the report but only counted on the terminal.
_QUIET_KINDS = (NOT_SELECTED, BALANCING)


def _splits(result: BuildResult) -> list[str]:
    present = {row.split for row in result.rows}
    return [name for name in SPLITS if name in present]


def summary_rows(result: BuildResult) -> list[list[str]]:
    """Header + one row per (source, label) + totals: image counts per split."""
    splits = _splits(result)
    counts = Counter((row.source, row.label, row.split) for row in result.rows)
    keys = sorted({(row.source, row.label) for row in result.rows})
    table = [["source", "label", *splits, "total"]]
    for source, label in keys:
        per_split = [counts[source, label, split] for split in splits]
        table.append([source, label, *map(str, per_split), str(sum(per_split))])
    totals = [sum(1 for row in result.rows if row.split == split) for split in splits]
    table.append(["all", "all", *map(str, totals), str(len(result.rows))])
    covid = [sum(1 for r in result.rows if r.split == split and r.target) for split in splits]
    shares = [_share(c, t) for c, t in zip(covid, totals, strict=True)]
    table.append(["all", "COVID share", *shares, _share(sum(covid), len(result.rows))])
    patients = [len({r.patient_id for r in result.rows if r.split == s}) for s in splits]
    every = len({r.patient_id for r in result.rows})
    table.append(["all", "patients", *map(str, patients), str(every)])
    return table


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for index, row in enumerate(table):
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def exclusion_counts(result: BuildResult) -> Counter[str]:
    return Counter(item.kind for item in result.excluded)


def duplicate_lines(result: BuildResult) -> list[str]:
    d = result.duplicates
    return [
        f"exact duplicate files excluded: {d['exact_duplicate_files_excluded']}",
        f"near-duplicate pairs (pHash distance <= {d['near_duplicate_distance']}): "
        f"{d['near_duplicate_pairs']} over {d['near_duplicate_images']} images "
        f"({d['near_pairs_between_patients']} between different patient ids, "
        f"{d['near_pairs_across_sources']} across sources); copies: {d['near_duplicates']}",
        f"provenance links tying patient ids of two archives: "
        f"{d['provenance_links_joining_patients']}",
        f"split groups holding several patient ids: {d['groups_with_several_patients']}",
    ]


def print_summary(result: BuildResult, out: Path) -> None:
    print(f"\n{result.recipe.name}: {len(result.rows)} images -> {out / MANIFEST_NAME}")
    print(format_table(summary_rows(result)))
    print()
    for line in duplicate_lines(result):
        print(line)
    counts = exclusion_counts(result)
    print(f"\nexcluded: {sum(counts.values())} ({_kinds(counts)})")
    shown = [e for e in result.excluded if e.kind not in _QUIET_KINDS]
    for item in sorted(shown, key=lambda e: e.kind):
        print(f"  [{item.kind}] {item.source}: {item.item}: {item.reason}")
    quiet = sum(counts[kind] for kind in _QUIET_KINDS)
    if quiet:
        print(f"  ... and {quiet} left out by the recipe's selection; listed in report.md")
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nbuilt in {result.seconds:.1f} s ({result.decoded} images decoded)")


def _kinds(counts: Counter[str]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in counts.most_common()) or "none"


def write_outputs(result: BuildResult, out: Path) -> dict[str, Path]:
    """Write manifest.csv, report.json and report.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(out / MANIFEST_NAME, result.rows, root=result.data_root)
    counts = exclusion_counts(result)
    report = {
        "recipe": to_dict(result.recipe),
        "data_root": str(result.data_root.resolve()),
        "manifest": MANIFEST_NAME,
        "paths": "relative to the data root (COVID_CXR_DATA) when under it, else absolute",
        "images": len(result.rows),
        "patients": len({row.patient_id for row in result.rows}),
        "summary": summary_rows(result),
        "duplicates": result.duplicates,
        "excluded_by_kind": dict(counts.most_common()),
        "excluded": [vars(item) for item in result.excluded],
        "near_duplicate_pairs": result.near_duplicate_pairs,
        "provenance_links": result.provenance_links,
        "notes": result.notes,
        "seconds": round(result.seconds, 2),
        "timings": {key: round(value, 2) for key, value in result.timings.items()},
        "decoded": result.decoded,
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(_markdown(result, counts), encoding="utf-8")
    return {"manifest": manifest, "json": json_path, "markdown": md_path}


def _markdown(result: BuildResult, counts: Counter[str]) -> str:
    recipe = result.recipe
    split = recipe.split
    parts = [
        f"# Dataset `{recipe.name}`",
        "",
        recipe.description or "",
        "",
        f"Built from `{result.data_root}` in {result.seconds:.1f} s. Split by patient group "
        f"{split.train:g}/{split.val:g}/{split.test:g} (train/val/test), seed {split.seed}; "
        "held-out sources go to `external`. Manifest paths are relative to the data root "
        "(`COVID_CXR_DATA`) when under it.",
        "",
        "## Images per source, label and split",
        "",
        _markdown_table(summary_rows(result)),
        "",
        "## Duplicates",
        "",
        *[f"- {line}" for line in duplicate_lines(result)],
        "",
        f"## Excluded ({sum(counts.values())})",
        "",
        *[f"- {kind}: {n}" for kind, n in counts.most_common()],
        "",
    ]
    if result.excluded:
        parts += ["| kind | source | item | reason |", "|---|---|---|---|"]
        parts += [
            f"| {e.kind} | {e.source} | {e.item} | {e.reason} |"
            for e in sorted(result.excluded, key=lambda e: e.kind)
        ]
    if result.notes:
        parts += ["", "## Notes", "", *[f"- {note}" for note in result.notes]]
    return "\n".join(parts) + "\n"
