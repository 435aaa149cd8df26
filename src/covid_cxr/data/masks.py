"""Lung masks: the three public mask collections as typed records, a patient split, a manifest.

Sources (folders under the data root, in their publishers' layouts):
- `jsrt/metadata.csv` (image, mask, patient_id): JSRT radiographs with the SCR lung masks,
  heart EXCLUDED; one image per patient.
- `openist-normal/metadata.csv` (image, mask): normal adults, hand-drawn masks; no patient id,
  so every image is its own patient, and near-duplicate pictures are joined by perceptual hash.
- `lung-masks/ieee8023.csv` (image, mask, annotator; paths relative to the data root): masks on
  COVID-19 radiographs of `covid-chestxray-dataset/`, mostly V7 Labs (lung behind the heart
  INCLUDED); the patient is the image's `patientid` in that collection's `metadata.csv`.

Every pair is decoded once: a pair is refused (with its reason) when either file is unreadable,
the mask's size differs from the image's, or the mask is empty. Groups that must stay together
(same patient, or images within 2 bits of perceptual hash, whole frame or central square) go to
one split as a whole (`covid_cxr.data.split.assign_groups`, stratified by source).

Manifest columns: image,mask,source,patient_id,split (paths relative to the data root).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from covid_cxr.config import SplitConfig
from covid_cxr.data.dedup import UnionFind, near_pairs, phashes
from covid_cxr.data.manifest import absolute, portable, shown_path
from covid_cxr.data.sources import MISSING, UNREADABLE, Exclusion
from covid_cxr.data.split import assign_groups
from covid_cxr.data.tables import read_table
from covid_cxr.errors import CovidCxrError, DataError, failure_reason
from covid_cxr.fileio import atomic_open
from covid_cxr.imaging.read import read_radiograph

JSRT, OPENIST, IEEE8023 = "jsrt", "openist", "ieee8023"
SOURCES = (JSRT, OPENIST, IEEE8023)
# What each source's masks call "lung" (the two conventions the model card discusses).
CONVENTIONS = {
    JSRT: "SCR: heart excluded",
    OPENIST: "hand-drawn, heart excluded",
    IEEE8023: "V7 Labs: lung behind the heart included",
}
COLUMNS = ("image", "mask", "source", "patient_id", "split")
SIZE_MISMATCH = "mask size differs"
EMPTY_MASK = "empty mask"
NEAR_DISTANCE = 2


@dataclass(frozen=True)
class MaskRecord:
    """One radiograph with its lung mask (absolute paths); `split` is set by the manifest."""

    image: Path
    mask: Path
    source: str
    patient_id: str
    split: str = ""


@dataclass
class MaskSet:
    records: list[MaskRecord] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, int]] = field(default_factory=list)


def _records_jsrt(root: Path, out: MaskSet) -> None:
    folder = root / "jsrt"
    rows = read_table(folder / "metadata.csv", ("image", "mask", "patient_id"), "JSRT metadata")
    for row in rows:
        _add(out, folder / row["image"], folder / row["mask"], JSRT, f"jsrt:{row['patient_id']}")


def _records_openist(root: Path, out: MaskSet) -> None:
    folder = root / "openist-normal"
    rows = read_table(folder / "metadata.csv", ("image", "mask"), "OpenIST metadata")
    for row in rows:
        image = folder / row["image"]
        _add(out, image, folder / row["mask"], OPENIST, f"openist:{Path(row['image']).stem}")


def _records_ieee8023(root: Path, out: MaskSet) -> None:
    rows = read_table(root / "lung-masks" / "ieee8023.csv", ("image", "mask"), "ieee8023 masks")
    meta = read_table(
        root / "covid-chestxray-dataset" / "metadata.csv",
        ("patientid", "filename"),
        "ieee8023 metadata.csv",
    )
    patient_of = {row["filename"]: row["patientid"] for row in meta}
    for row in rows:
        image = root / row["image"]
        patient = patient_of.get(image.name)
        if patient is None:
            out.excluded.append(
                Exclusion(IEEE8023, row["image"], "no metadata", "no metadata.csv row names it")
            )
            continue
        _add(out, image, root / row["mask"], IEEE8023, f"ieee8023:{patient}")


def _add(out: MaskSet, image: Path, mask: Path, source: str, patient: str) -> None:
    for path in (image, mask):
        if not path.is_file():
            out.excluded.append(Exclusion(source, shown_path(path), MISSING, "file not on disk"))
            return
    out.records.append(MaskRecord(image, mask, source, patient))


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a boolean (H, W) array: lung where the grey level is above half."""
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("L")) >= 128


def _check(record: MaskRecord) -> tuple[tuple[int, int], str]:
    """The image's perceptual hashes, or "" and the reason the pair cannot be used."""
    try:
        pixels = read_radiograph(record.image).pixels
    except (CovidCxrError, OSError) as exc:
        return (0, 0), f"image: {failure_reason(exc)}"
    try:
        mask = read_mask(record.mask)
    except (OSError, ValueError) as exc:
        return (0, 0), f"mask unreadable: {failure_reason(exc)}"
    if mask.shape != pixels.shape:
        return (0, 0), f"{SIZE_MISMATCH}: mask {mask.shape[::-1]} vs image {pixels.shape[::-1]}"
    if not mask.any():
        return (0, 0), EMPTY_MASK
    return phashes(pixels), ""


def read_mask_sources(root: Path, sources: Iterable[str] = SOURCES) -> MaskSet:
    """Every usable (image, mask) pair of `sources`, and every pair left out with its reason."""
    readers = {JSRT: _records_jsrt, OPENIST: _records_openist, IEEE8023: _records_ieee8023}
    found = MaskSet()
    for source in sources:
        if source not in readers:
            raise DataError(f"unknown mask source {source!r}; known: {', '.join(SOURCES)}")
        readers[source](Path(root), found)
    result = MaskSet(excluded=list(found.excluded))
    hashes: list[tuple[int, int]] = []
    for record in found.records:
        hashed, problem = _check(record)
        if problem:
            kind = SIZE_MISMATCH if problem.startswith(SIZE_MISMATCH) else UNREADABLE
            kind = EMPTY_MASK if problem == EMPTY_MASK else kind
            excluded = Exclusion(record.source, shown_path(record.image), kind, problem)
            result.excluded.append(excluded)
        else:
            result.records.append(record)
            hashes.append(hashed)
    closest: dict[tuple[int, int], int] = {}
    for which in (0, 1):
        for a, b, distance in near_pairs([h[which] for h in hashes], NEAR_DISTANCE):
            closest[a, b] = min(distance, closest.get((a, b), distance))
    result.near_duplicates = [
        (str(result.records[a].image), str(result.records[b].image), d)
        for (a, b), d in sorted(closest.items())
    ]
    return result


def split_masks(masks: MaskSet, config: SplitConfig) -> list[MaskRecord]:
    """Records with their split; patients joined by near-duplicate images share one split."""
    groups = UnionFind(r.patient_id for r in masks.records)
    by_image = {str(r.image): r for r in masks.records}
    for a, b, _ in masks.near_duplicates:
        groups.union(by_image[a].patient_id, by_image[b].patient_id)
    members: dict[object, list[MaskRecord]] = defaultdict(list)
    for record in masks.records:
        members[groups.find(record.patient_id)].append(record)
    keys = sorted(members, key=str)
    strata = [members[key][0].source for key in keys]
    assignment = assign_groups([len(members[key]) for key in keys], strata, config)
    split_of = {key: split for key, split in zip(keys, assignment, strict=True)}
    return [
        MaskRecord(r.image, r.mask, r.source, r.patient_id, split_of[groups.find(r.patient_id)])
        for r in masks.records
    ]


def write_mask_manifest(path: str | Path, records: Iterable[MaskRecord], root: Path) -> Path:
    base = Path(root)
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for r in records:
            image, mask = portable(r.image, base), portable(r.mask, base)
            writer.writerow([image, mask, r.source, r.patient_id, r.split])
    return Path(path)


def write_exclusions(path: str | Path, excluded: Iterable[Exclusion]) -> Path:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("source", "item", "kind", "reason"))
        for item in excluded:
            writer.writerow((item.source, item.item, item.kind, item.reason))
    return Path(path)


def load_mask_manifest(path: str | Path, root: Path | None = None) -> list[MaskRecord]:
    """Read a mask manifest; relative paths resolve against `root` (default: the data root)."""
    from covid_cxr.paths import data_root

    path = Path(path)
    rows = read_table(path, COLUMNS, "a lung-mask manifest")
    if not rows:
        raise DataError(f"{path}: mask manifest has no rows; rebuild it (covid-cxr data masks)")
    base = root or data_root()
    records = []
    for line, row in enumerate(rows, start=2):
        empty = [column for column in COLUMNS if not row.get(column)]
        if empty:
            raise DataError(f"{path}: line {line}: column(s) {', '.join(empty)} empty")
        image, mask = Path(row["image"]), Path(row["mask"])
        records.append(
            MaskRecord(
                absolute(base / image),
                absolute(base / mask),
                row["source"],
                row["patient_id"],
                row["split"],
            )
        )
    return records
