"""`covid-cxr data build`: sources -> one manifest with a leak-free, patient-level split.

The steps, each leaving a reason for every image it drops:
1. read every source of the recipe (and its label/view selection);
2. decode every image once (unreadable ones are excluded) and hash it;
3. exact duplicate files (same sha256) keep their first copy;
4. per-source limits, then optional class balancing;
5. patients are grouped with union-find: same patient id, exact duplicates, near duplicates
   (perceptual hash) and provenance links (one archive re-publishing another's image);
6. groups touching a held-out source go to "external"; the rest are split by group.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covid_cxr.config import DataRecipe, SourceSpec
from covid_cxr.data.dedup import UnionFind, near_pairs
from covid_cxr.data.fingerprint import Fingerprint, fingerprint
from covid_cxr.data.labels import COVID, normalise_label
from covid_cxr.data.manifest import EXTERNAL, SPLITS, ManifestRow, absolute, portable
from covid_cxr.data.sources import (
    BALANCING,
    DUPLICATE,
    HOLDOUT_OVERLAP,
    NEAR_DUPLICATE,
    NOT_SELECTED,
    UNREADABLE,
    Exclusion,
    Record,
    open_source,
)
from covid_cxr.data.split import assign_groups
from covid_cxr.errors import ConfigError, DataError

Show = Callable[[Path], str]  # how a path appears in the report


@dataclass
class BuildResult:
    """The manifest rows plus everything the report shows."""

    recipe: DataRecipe
    data_root: Path
    rows: list[ManifestRow]
    excluded: list[Exclusion]
    notes: list[str]
    duplicates: dict[str, Any]
    near_duplicate_pairs: list[dict[str, Any]]
    provenance_links: dict[str, list[str]]
    decoded: int
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class _Candidate:
    record: Record
    spec: int  # index of its SourceSpec in the recipe
    found: Fingerprint


def resolve_source(spec: SourceSpec, data_root: Path) -> Path:
    path = Path(spec.path).expanduser()
    return path if path.is_absolute() else data_root / path


def build_dataset(
    recipe: DataRecipe,
    *,
    data_root: Path,
    workers: int = 2,
    cache_file: Path | None = None,
    progress: bool = True,
) -> BuildResult:
    """Run the whole build in memory; `write_outputs` (report.py) puts it on disk."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    excluded: list[Exclusion] = []
    notes: list[str] = []
    selected = _read_sources(recipe, data_root, excluded, notes)
    timings["read sources"] = time.perf_counter() - started

    mark = time.perf_counter()
    prints, decoded = fingerprint(
        [record.path for record, _ in selected],
        workers=workers,
        cache_file=cache_file,
        progress=progress,
    )
    candidates = [
        _Candidate(record, spec, found)
        for (record, spec), found in zip(selected, prints, strict=True)
    ]
    timings["decode and hash"] = time.perf_counter() - mark

    mark = time.perf_counter()
    show = _shower(data_root)
    groups = UnionFind()
    kept = _drop_unreadable_and_exact(candidates, groups, excluded, show)
    exact_files = sum(1 for e in excluded if e.kind == DUPLICATE)
    kept = _apply_limits(kept, recipe, excluded, show)
    rng = random.Random(recipe.split.seed)
    if recipe.balance == "overall":
        kept = _balance(kept, rng, excluded, show, "overall")
    pairs = _near_duplicates(kept, recipe.near_duplicate_distance)
    links = _link_groups(kept, pairs, groups)
    if recipe.near_duplicates == "drop":
        kept = _drop_near_duplicates(kept, pairs, excluded, show)
    splits = _split(kept, recipe, groups, excluded, show)
    if recipe.balance == "per-split":
        for name in SPLITS[:3]:
            members = [c for c in kept if splits.get(id(c)) == name]
            survivors = {id(c) for c in _balance(members, rng, excluded, show, name)}
            kept = [c for c in kept if splits.get(id(c)) != name or id(c) in survivors]
    kept = [c for c in kept if id(c) in splits]
    timings["group and split"] = time.perf_counter() - mark

    rows = [
        ManifestRow(
            path=absolute(c.record.path),
            label=c.record.label,
            source=c.record.source,
            patient_id=c.record.patient_id,
            view=c.record.view,
            sha256=c.found.sha256,
            split=splits[id(c)],
        )
        for c in kept
    ]
    duplicates = _duplicate_summary(recipe, exact_files, pairs, links, rows, groups)
    near_report = [
        {
            "a": show(a.record.path),
            "b": show(b.record.path),
            "distance": distance,
            "patients": sorted({a.record.patient_id, b.record.patient_id}),
        }
        for a, b, distance in pairs
    ]
    return BuildResult(
        recipe=recipe,
        data_root=data_root,
        rows=rows,
        excluded=excluded,
        notes=notes,
        duplicates=duplicates,
        near_duplicate_pairs=near_report,
        provenance_links=links,
        decoded=decoded,
        seconds=time.perf_counter() - started,
        timings=timings,
    )


def _duplicate_summary(
    recipe: DataRecipe,
    exact_files: int,
    pairs: list[tuple[_Candidate, _Candidate, int]],
    links: dict[str, list[str]],
    rows: list[ManifestRow],
    groups: UnionFind,
) -> dict[str, Any]:
    patients: dict[Any, set[str]] = defaultdict(set)
    for row in rows:
        patients[groups.find(row.patient_id)].add(row.patient_id)
    return {
        "near_duplicate_distance": recipe.near_duplicate_distance,
        "near_duplicates": recipe.near_duplicates,
        "exact_duplicate_files_excluded": exact_files,
        "near_duplicate_pairs": len(pairs),
        "near_duplicate_images": len({id(c) for a, b, _ in pairs for c in (a, b)}),
        "near_pairs_between_patients": sum(
            1 for a, b, _ in pairs if a.record.patient_id != b.record.patient_id
        ),
        "near_pairs_across_sources": sum(
            1 for a, b, _ in pairs if a.record.source != b.record.source
        ),
        "provenance_links_joining_patients": len(links),
        "groups_with_several_patients": sum(1 for ids in patients.values() if len(ids) > 1),
    }


def _read_sources(
    recipe: DataRecipe, data_root: Path, excluded: list[Exclusion], notes: list[str]
) -> list[tuple[Record, int]]:
    """Every record the recipe selects, with the index of its source spec."""
    candidates: list[tuple[Record, int]] = []
    names: dict[str, str] = {}
    show = _shower(data_root)
    for index, spec in enumerate(recipe.sources):
        root = resolve_source(spec, data_root)
        if not Path(spec.path).is_absolute() and not data_root.is_dir():
            raise DataError(
                f"data root {data_root} not found; set COVID_CXR_DATA or pass --data-root"
            )
        reader = open_source(spec.kind, root, spec.name)
        if reader.name in names:
            raise ConfigError(
                f"two sources are named {reader.name!r} ({names[reader.name]} and {root}); "
                "give each a distinct `name`"
            )
        names[reader.name] = str(root)
        result = reader.read()
        excluded += result.excluded
        notes += result.notes
        labels = {normalise_label(label) for label in spec.labels}
        views = {view.upper() for view in spec.views}
        for record in result.records:
            item = show(record.path)
            if labels and record.label not in labels:
                reason = f"label {record.label} not among the recipe's labels {sorted(labels)}"
                excluded.append(Exclusion(record.source, item, NOT_SELECTED, reason))
            elif views and record.view.upper() not in views:
                reason = f"view {record.view or '(unknown)'} not among the recipe's views"
                excluded.append(Exclusion(record.source, item, NOT_SELECTED, reason))
            else:
                candidates.append((record, index))
    if not candidates:
        raise DataError("no images left to build from; see the exclusions above")
    return candidates


def _shower(data_root: Path) -> Show:
    """Paths in reports are shown relative to the data root, like in the manifest."""

    def show(path: Path) -> str:
        return portable(path, data_root)

    return show


def _drop_unreadable_and_exact(
    candidates: list[_Candidate], groups: UnionFind, excluded: list[Exclusion], show: Show
) -> list[_Candidate]:
    kept: list[_Candidate] = []
    first: dict[str, _Candidate] = {}
    for candidate in candidates:
        record, found = candidate.record, candidate.found
        groups.add(record.patient_id)
        if found.error:
            excluded.append(Exclusion(record.source, show(record.path), UNREADABLE, found.error))
            continue
        original = first.get(found.sha256)
        if original is None:
            first[found.sha256] = candidate
            kept.append(candidate)
            continue
        # The copy goes, but its patient stays tied to the original's: a patient's other
        # images must follow the copy's twin into the same split.
        groups.union(original.record.patient_id, record.patient_id)
        if original.record.path == record.path:
            reason = f"same file listed again (kept once, for patient {original.record.patient_id})"
        else:
            reason = f"duplicate of {show(original.record.path)}"
        excluded.append(Exclusion(record.source, show(record.path), DUPLICATE, reason))
    return kept


def _apply_limits(
    kept: list[_Candidate], recipe: DataRecipe, excluded: list[Exclusion], show: Show
) -> list[_Candidate]:
    """A source's `limit` keeps its first images in the publisher's order."""
    taken: Counter[int] = Counter()
    selected = []
    for candidate in kept:
        limit = recipe.sources[candidate.spec].limit
        if limit and taken[candidate.spec] >= limit:
            reason = f"beyond the recipe's limit of {limit} images for this source"
            record = candidate.record
            excluded.append(Exclusion(record.source, show(record.path), NOT_SELECTED, reason))
            continue
        taken[candidate.spec] += 1
        selected.append(candidate)
    return selected


def _balance(
    members: list[_Candidate], rng: random.Random, excluded: list[Exclusion], show: Show, where: str
) -> list[_Candidate]:
    """Downsample the larger of COVID / non-COVID to the size of the smaller (seeded)."""
    by_class: dict[bool, list[_Candidate]] = defaultdict(list)
    for candidate in members:
        by_class[candidate.record.label == COVID].append(candidate)
    if len(by_class) < 2:
        return members
    size = min(len(group) for group in by_class.values())
    dropped: set[int] = set()
    for group in by_class.values():
        if len(group) > size:
            dropped.update(id(c) for c in rng.sample(group, len(group) - size))
    reason = f"class balancing ({where}): {size} COVID and {size} non-COVID kept"
    for candidate in members:
        if id(candidate) in dropped:
            record = candidate.record
            excluded.append(Exclusion(record.source, show(record.path), BALANCING, reason))
    return [c for c in members if id(c) not in dropped]


def _near_duplicates(
    kept: list[_Candidate], max_distance: int
) -> list[tuple[_Candidate, _Candidate, int]]:
    """Pairs whose whole-frame or central-square hashes are within `max_distance` bits."""
    closest: dict[tuple[int, int], int] = {}
    for attribute in ("phash", "square_phash"):
        hashes = [getattr(c.found, attribute) for c in kept]
        for a, b, distance in near_pairs(hashes, max_distance):
            closest[a, b] = min(distance, closest.get((a, b), distance))
    return [(kept[a], kept[b], distance) for (a, b), distance in sorted(closest.items())]


def _link_groups(
    kept: list[_Candidate], pairs: list[tuple[_Candidate, _Candidate, int]], groups: UnionFind
) -> dict[str, list[str]]:
    """Join the patients of near duplicates and of provenance links.

    Returns the links that tie different patient ids together, with those ids.
    """
    for a, b, _ in pairs:
        groups.union(a.record.patient_id, b.record.patient_id)
    patients_by_link: dict[str, set[str]] = defaultdict(set)
    for candidate in kept:
        for link in candidate.record.links:
            patients_by_link[link].add(candidate.record.patient_id)
    joined = {}
    for link, patients in patients_by_link.items():
        first, *others = sorted(patients)
        for other in others:
            groups.union(first, other)
        if others:
            joined[link] = [first, *others]
    return joined


def _drop_near_duplicates(
    kept: list[_Candidate],
    pairs: list[tuple[_Candidate, _Candidate, int]],
    excluded: list[Exclusion],
    show: Show,
) -> list[_Candidate]:
    """Keep the first image of each near-duplicate pair or provenance link (source order)."""
    dropped: dict[int, str] = {}
    for a, b, distance in pairs:
        if id(a) not in dropped and id(b) not in dropped:
            dropped[id(b)] = f"near duplicate of {show(a.record.path)} (distance {distance})"
    first_of_link: dict[str, _Candidate] = {}
    for candidate in kept:
        for link in candidate.record.links:
            original = first_of_link.setdefault(link, candidate)
            if original is not candidate and id(candidate) not in dropped:
                dropped[id(candidate)] = f"same image as {show(original.record.path)} ({link})"
    for candidate in kept:
        if id(candidate) in dropped:
            record = candidate.record
            excluded.append(
                Exclusion(record.source, show(record.path), NEAR_DUPLICATE, dropped[id(candidate)])
            )
    return [c for c in kept if id(c) not in dropped]


def _split(
    kept: list[_Candidate],
    recipe: DataRecipe,
    groups: UnionFind,
    excluded: list[Exclusion],
    show: Show,
) -> dict[int, str]:
    """Split per candidate: held-out groups go to "external", the rest by `assign_groups`."""
    held_out = {groups.find(c.record.patient_id) for c in kept if recipe.sources[c.spec].holdout}
    splits: dict[int, str] = {}
    members: dict[Any, list[_Candidate]] = defaultdict(list)
    for candidate in kept:
        group = groups.find(candidate.record.patient_id)
        record = candidate.record
        if group not in held_out:
            members[group].append(candidate)
        elif recipe.sources[candidate.spec].holdout:
            splits[id(candidate)] = EXTERNAL
        else:
            reason = "same patient or image as a held-out source's image"
            excluded.append(Exclusion(record.source, show(record.path), HOLDOUT_OVERLAP, reason))
    keys = list(members)
    strata = [
        Counter((c.record.source, c.record.label) for c in members[key]).most_common(1)[0][0]
        for key in keys
    ]
    assignment = assign_groups([len(members[key]) for key in keys], strata, recipe.split)
    for key, split in zip(keys, assignment, strict=True):
        for candidate in members[key]:
            splits[id(candidate)] = split
    return splits
