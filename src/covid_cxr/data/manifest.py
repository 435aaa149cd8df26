"""The manifest: one CSV row per image, the contract between the data build and every later stage.

Columns: path,label,source,patient_id,view,sha256,split.

`path` is stored relative to the data root (POSIX separators) when the image lies under it and
absolute otherwise, so a manifest built here works on another machine whose datasets live
elsewhere: `load_manifest` resolves relative paths against `root`, else `COVID_CXR_DATA`
(`covid_cxr.paths.data_root()`).

`split` is "train", "val", "test", or "external" for a source a recipe holds out (a hospital the
model never sees in training). Training uses train/val only.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from covid_cxr.data.dedup import file_sha256
from covid_cxr.data.labels import COVID
from covid_cxr.data.sources import Exclusion, LabelledCsv, LabelledFolder, SourceReader
from covid_cxr.data.tables import read_table
from covid_cxr.errors import DataError
from covid_cxr.paths import data_root

COLUMNS = ("path", "label", "source", "patient_id", "view", "sha256", "split")
# Images no model trains on: sources a recipe holds out, and a user's own labelled data.
EXTERNAL = "external"
SPLITS = ("train", "val", "test", EXTERNAL)


@dataclass(frozen=True)
class ManifestRow:
    """One image: absolute path, label ("COVID", "Normal", or another finding), its split."""

    path: Path
    label: str
    source: str
    patient_id: str
    view: str
    sha256: str
    split: str

    @property
    def target(self) -> int:
        """The binary training target: 1 for COVID-19, 0 for everything else."""
        return 1 if self.label == COVID else 0


class LabelledRows(list[ManifestRow]):
    """Rows of a user's labelled data, plus what was left out (and why) for the report."""

    def __init__(self, rows: Iterable[ManifestRow], excluded: Iterable[Exclusion] = ()) -> None:
        super().__init__(rows)
        self.excluded: list[Exclusion] = list(excluded)
        self.notes: list[str] = []


def write_manifest(path: str | Path, rows: Iterable[ManifestRow], root: Path | None = None) -> Path:
    """Write rows as CSV; paths under `root` (default: the data root) are stored relative."""
    path = Path(path)
    base = root or data_root()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    portable(row.path, base),
                    row.label,
                    row.source,
                    row.patient_id,
                    row.view,
                    row.sha256,
                    row.split,
                ]
            )
    return path


def absolute(path: Path) -> Path:
    """`path` made absolute and normalised without resolving symbolic links: a data folder
    reached through a link keeps the paths its user sees (resolving would turn
    ../shared/datasets/x.png into the link's target, and equal rows would compare unequal)."""
    return Path(os.path.abspath(path))


def portable(path: Path, base: Path) -> str:
    """`path` relative to `base` (POSIX) when it lies under it, else absolute."""
    for candidate, root in ((absolute(path), absolute(base)), (path.resolve(), base.resolve())):
        if candidate.is_relative_to(root):
            return candidate.relative_to(root).as_posix()
    return str(absolute(path))


def shown_path(path: str | Path) -> str:
    """How reports name a file: relative to the data root when it lies there (like the
    manifest), else relative to the working folder, else absolute; so committed reports do not
    carry the folder layout of the machine that made them."""
    path = Path(path)
    for base in (data_root(), Path.cwd()):
        shown = portable(path, base)
        if not Path(shown).is_absolute():
            return shown
    return str(absolute(path))


def load_manifest(path: str | Path, root: Path | None = None) -> list[ManifestRow]:
    """Read a manifest; relative paths resolve against `root` (default: the data root).

    Raises DataError naming the file, line and column when it is missing, empty or malformed.
    """
    path = Path(path)
    rows = read_table(path, COLUMNS, "a manifest")
    if not rows:
        raise DataError(f"{path}: manifest has a header but no rows; rebuild it (covid-cxr data)")
    base = root or data_root()
    loaded = []
    for line, row in enumerate(rows, start=2):
        for column in ("path", "label", "patient_id", "split"):
            if not row.get(column):
                raise DataError(f"{path}: line {line}: column {column} is empty")
        if row["split"] not in SPLITS:
            raise DataError(
                f"{path}: line {line}: column split is {row['split']!r}; "
                f"expected one of {', '.join(SPLITS)}"
            )
        image = Path(row["path"])
        loaded.append(
            ManifestRow(
                path=absolute(base / image),
                label=row["label"],
                source=row["source"],
                patient_id=row["patient_id"],
                view=row["view"],
                sha256=row["sha256"],
                split=row["split"],
            )
        )
    return loaded


def load_labelled(path: str | Path) -> LabelledRows:
    """Labelled images from a manifest CSV, a labelled CSV (path,label[,patient_id,source,view])
    or a folder with one sub-folder per class; used to test a model on a user's own images.

    Rows not from a manifest get split "external" and their file's sha256 (to spot images that
    were also used in training). What was left out is in `.excluded`, never dropped silently.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give a manifest, CSV or class folder")
    if path.is_file() and _is_manifest(path):
        return LabelledRows(load_manifest(path))
    reader: SourceReader = LabelledCsv(path) if path.is_file() else LabelledFolder(path)
    result = reader.read()
    rows = LabelledRows(
        (
            ManifestRow(
                absolute(record.path),
                record.label,
                record.source,
                record.patient_id,
                record.view,
                file_sha256(record.path),
                EXTERNAL,
            )
            for record in result.records
        ),
        result.excluded,
    )
    rows.notes = result.notes
    if not rows:
        raise DataError(f"{path}: no images found ({len(rows.excluded)} file(s) left out)")
    return rows


def _is_manifest(path: Path) -> bool:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    return set(COLUMNS) <= {name.strip() for name in header}
