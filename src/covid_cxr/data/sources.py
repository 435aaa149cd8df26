"""Readers for the public chest X-ray layouts and for users' own labelled data.

Each reader turns one folder (or CSV) into `Record`s, one per image with label, patient and view,
and `Exclusion`s, one per row or file left out with its reason: nothing is dropped silently.
Patient ids are prefixed with the collection's namespace, so ids of different collections never
collide while two folders of one collection (Kaggle `chest_xray` and `kaggle-normal-196`, the
same children at two resolutions) share theirs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from covid_cxr.data.labels import NORMAL, finding_label, normalise_label
from covid_cxr.data.tables import read_table
from covid_cxr.errors import DataError

# Exclusion kinds: the report counts exclusions per kind.
CT = "CT"
NOT_XRAY = "not an X-ray"
LATERAL = "lateral view"
NOT_FRONTAL = "not frontal"
MISSING = "missing file"
NO_LABEL = "no label"
NO_METADATA = "no metadata"
HIDDEN = "hidden file"
UNREADABLE = "unreadable image"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near duplicate"
NOT_SELECTED = "not selected by recipe"
BALANCING = "class balancing"
HOLDOUT_OVERLAP = "overlaps held-out source"


@dataclass(frozen=True)
class Record:
    """One image a source offers; `finding` keeps the publisher's own wording."""

    path: Path
    label: str
    source: str
    patient_id: str
    view: str = ""
    finding: str = ""
    links: tuple[str, ...] = ()  # provenance keys: records sharing one show the same image


@dataclass(frozen=True)
class Exclusion:
    """A file or metadata row left out; `item` names it, `kind` groups it for counting."""

    source: str
    item: str
    kind: str
    reason: str


@dataclass
class SourceResult:
    records: list[Record] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class SourceReader:
    """Base of the readers: `root` is the source folder (or CSV file), `name` its manifest name."""

    kind: ClassVar[str]
    namespace: ClassVar[str] = ""  # patient-id prefix shared by every copy of one collection
    expects_file: ClassVar[bool] = False

    def __init__(self, root: Path, name: str = "") -> None:
        root = Path(root)
        exists = root.is_file() if self.expects_file else root.is_dir()
        if not exists:
            what = "file" if self.expects_file else "folder"
            raise DataError(f"{root}: {self.kind} source not found (expected a {what})")
        self.root = root
        self.name = name or (root.stem if self.expects_file else root.name)
        self._result = SourceResult()
        self._own_ids = 0

    def read(self) -> SourceResult:
        self._result = SourceResult()
        self._own_ids = 0
        self._read()
        if self._own_ids:
            self._result.notes.append(
                f"{self.name}: {self._own_ids} image(s) without a patient id; each counts as its "
                "own patient, so several images of one patient could land in different splits"
            )
        return self._result

    def _read(self) -> None:
        raise NotImplementedError

    def _add(
        self,
        path: Path,
        label: str,
        patient: str | None,
        view: str = "",
        finding: str = "",
        source: str = "",
        links: tuple[str, ...] = (),
    ) -> None:
        source = source or self.name
        if not label:
            self._exclude(path, NO_LABEL, "no label given")
            return
        if not path.is_file():
            self._exclude(path, MISSING, "image file not on disk")
            return
        namespace = self.namespace or source
        if patient:
            patient_id = f"{namespace}:{patient}"
        else:
            self._own_ids += 1
            patient_id = f"{namespace}:file:{self._display(path)}"
        record = Record(path, label, source, patient_id, view, finding or label, links)
        self._result.records.append(record)

    def _exclude(self, item: Path | str, kind: str, reason: str) -> None:
        shown = self._display(item) if isinstance(item, Path) else item
        self._result.excluded.append(Exclusion(self.name, shown, kind, reason))

    def _exclude_undescribed(self, folder: Path, described: set[Path], table: str) -> None:
        """Files in `folder` that no metadata row names are left out, each with the reason."""
        if folder.is_dir():
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                if path not in described:
                    self._exclude(path, NO_METADATA, f"no {table} row describes this image")

    def _display(self, path: Path) -> str:
        base = self.root.parent if self.expects_file else self.root
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            return str(path)


def image_link(archive: str, image_id: str) -> str:
    """The provenance key of image `image_id` of a public archive (e.g. "hannover")."""
    return f"{archive}-image:{image_id}"


def _is_frontal(view: str) -> bool:
    return view.upper().startswith(("PA", "AP"))


class Ieee8023(SourceReader):
    """ieee8023/covid-chestxray-dataset: `metadata.csv` (one row per image) + `images/`.

    Only frontal X-rays are kept: CT rows, lateral views and rows whose image is absent are
    excluded with their reason, as are files on disk that no row describes.
    """

    kind = "ieee8023"
    namespace = "ieee8023"
    _COLUMNS = ("patientid", "finding", "view", "modality", "folder", "filename")
    # The collection re-publishes images of other archives (re-cropped, under its own patient
    # ids); a row whose url names such an archive is linked to the archive's image id.
    UPSTREAM: ClassVar[dict[str, str]] = {"ml-workgroup/covid-19-image-repository": "hannover"}

    def _read(self) -> None:
        rows = read_table(self.root / "metadata.csv", self._COLUMNS, "ieee8023 metadata.csv")
        described = set()
        for number, row in enumerate(rows, start=1):
            path = self.root / row["folder"] / row["filename"]
            described.add(path)
            item = f"metadata.csv row {number}: {row['folder']}/{row['filename']}"
            modality, view = row["modality"], row["view"]
            if modality.lower() != "x-ray":
                kind = CT if modality.upper() == "CT" else NOT_XRAY
                self._exclude(item, kind, f"modality {modality or '?'} ({view}), not an X-ray")
            elif view.upper() == "L" or view.lower().startswith("lat"):
                self._exclude(item, LATERAL, f"lateral view ({view})")
            elif not _is_frontal(view):
                self._exclude(item, NOT_FRONTAL, f"view {view or '(blank)'} is not PA or AP")
            elif not path.is_file():
                self._exclude(item, MISSING, "image named in metadata.csv is not on disk")
            else:
                label = finding_label(row["finding"])
                links = tuple(
                    image_link(archive, Path(row["filename"]).stem)
                    for marker, archive in self.UPSTREAM.items()
                    if marker in row.get("url", "")
                )
                self._add(path, label, row["patientid"], view, row["finding"], links=links)
        self._exclude_undescribed(self.root / "images", described, "metadata.csv")


class Hannover(SourceReader):
    """Hannover Medical School covid-19-image-repository: `data.csv` + `png/<image_id>.png`.

    Every image is COVID-19 positive; `projection` (ap/pa) becomes the view.
    """

    kind = "hannover"
    namespace = "hannover"

    def _read(self) -> None:
        rows = read_table(
            self.root / "data.csv", ("patient_id", "image_id", "projection"), "Hannover data.csv"
        )
        described = set()
        for row in rows:
            path = self.root / "png" / f"{row['image_id']}.png"
            described.add(path)
            self._add(
                path,
                "COVID",
                row["patient_id"],
                row["projection"].upper(),
                "COVID-19",
                links=(image_link(self.namespace, row["image_id"]),),
            )
        self._exclude_undescribed(self.root / "png", described, "data.csv")


class _MaskedCollection(SourceReader):
    """A collection of adult PA radiographs with lung masks: `metadata.csv` + `images/`.

    None of them has COVID-19. The masks are for the lung segmenter (`covid_cxr.data.masks`);
    here only the radiographs are read, as non-COVID images of a hospital of their own.
    """

    _PATIENT_COLUMN: ClassVar[str | None] = None

    def _label(self, finding: str) -> str:
        return normalise_label(finding)

    def _read(self) -> None:
        required = ("image", "finding", *filter(None, (self._PATIENT_COLUMN,)))
        rows = read_table(self.root / "metadata.csv", required, f"{self.kind} metadata.csv")
        described = set()
        for row in rows:
            path = self.root / row["image"]
            described.add(path)
            patient = row[self._PATIENT_COLUMN] if self._PATIENT_COLUMN else None
            self._add(path, self._label(row["finding"]), patient, "PA", row["finding"])
        self._exclude_undescribed(self.root / "images", described, "metadata.csv")


class Jsrt(_MaskedCollection):
    """JSRT database (Shiraishi et al. 2000), Japan: film radiographs, one per patient.

    `finding` is "lung nodule" or "no nodule"; both are non-COVID ("no nodule" is Normal).
    """

    kind = "jsrt"
    namespace = "jsrt"
    _PATIENT_COLUMN = "patient_id"

    def _label(self, finding: str) -> str:
        return NORMAL if finding.strip().lower() == "no nodule" else normalise_label(finding)


class OpenIstNormal(_MaskedCollection):
    """Normal adult radiographs of a US teaching collection (published by the OpenIST project).

    No patient ids are given: each image counts as its own patient, and the builder's
    perceptual hash groups the one near-duplicate pair into one split.
    """

    kind = "openist-normal"
    namespace = "openist"


class _ClassFolders(SourceReader):
    """Layouts where a folder name gives the class and (maybe) the file name the patient."""

    _PATIENT: ClassVar[re.Pattern[str] | None] = None

    def _class_folders(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not _hidden(p))

    def _label(self, folder: Path) -> str:
        return normalise_label(folder.name)

    def _finding(self, path: Path, label: str) -> str:
        return label

    def _read(self) -> None:
        folders = self._class_folders()
        if not folders:
            raise DataError(f"{self.root}: no class folders found for a {self.kind} source")
        for folder in folders:
            label = self._label(folder)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                if _hidden(path):
                    self._exclude(path, HIDDEN, "hidden file, not an image")
                    continue
                match = self._PATIENT.match(path.name) if self._PATIENT else None
                patient = next((g for g in match.groups() if g), None) if match else None
                self._add(path, label, patient, finding=self._finding(path, label))


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


class KagglePneumonia(_ClassFolders):
    """Kermany "Chest X-Ray Images (Pneumonia)": `[<split>/]NORMAL|PNEUMONIA/<file>.jpeg`.

    The patient is in the file name: `person123_bacteria_45.jpeg` (bacterial and viral images of
    person123 are one child), `IM-0115-0001.jpeg` and `NORMAL2-IM-0381-0001.jpeg` (two numbering
    series, kept apart). The uploader's split folders are ignored: the builder splits by patient.
    """

    kind = "kaggle-pneumonia"
    namespace = "kermany"
    _CLASSES: ClassVar[dict[str, str]] = {"NORMAL": "Normal", "PNEUMONIA": "Pneumonia"}
    _PATIENT = re.compile(r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)-")

    def _class_folders(self) -> list[Path]:
        levels = [self.root, *super()._class_folders()]
        return [
            child
            for level in levels
            for child in sorted(level.iterdir())
            if child.is_dir() and child.name.upper() in self._CLASSES
        ]

    def _label(self, folder: Path) -> str:
        return self._CLASSES[folder.name.upper()]

    def _finding(self, path: Path, label: str) -> str:
        if "_virus" in path.name:
            return "Pneumonia/Viral"
        if "_bacteria" in path.name:
            return "Pneumonia/Bacterial"
        return label


class Nih(_ClassFolders):
    """NIH ChestX-ray8 images sorted into one folder per finding (`No_Finding`, `Pneumonia`).

    `00001250_006.png` is follow-up 6 of patient 00001250.
    """

    kind = "nih"
    namespace = "nih"
    _PATIENT = re.compile(r"^(\d{8})_\d{3}\.")


class LabelledFolder(_ClassFolders):
    """A user's folder with one sub-folder per class (covid/, normal/, ...); no patient ids."""

    kind = "folder"


class LabelledCsv(SourceReader):
    """A user's CSV `path,label[,patient_id,source,view]`, paths relative to the CSV's folder."""

    kind = "csv"
    expects_file = True
    COLUMNS = ("path", "label")

    def _read(self) -> None:
        rows = read_table(self.root, self.COLUMNS, "a labelled CSV (path,label[,patient_id])")
        if not rows:
            raise DataError(f"{self.root}: labelled CSV has a header but no rows")
        for number, row in enumerate(rows, start=1):
            if not row["path"]:
                self._exclude(f"{self.root.name} row {number}", MISSING, "empty path")
                continue
            path = Path(row["path"]).expanduser()
            if not path.is_absolute():
                path = self.root.parent / path
            self._add(
                path,
                normalise_label(row["label"]),
                row.get("patient_id") or None,
                row.get("view", ""),
                source=row.get("source", ""),
            )


READERS: dict[str, type[SourceReader]] = {
    reader.kind: reader
    for reader in (
        Ieee8023,
        KagglePneumonia,
        Nih,
        Hannover,
        Jsrt,
        OpenIstNormal,
        LabelledFolder,
        LabelledCsv,
    )
}


def open_source(kind: str, path: Path, name: str = "") -> SourceReader:
    """The reader for `kind` on `path`; an unknown kind lists the known ones."""
    try:
        reader = READERS[kind]
    except KeyError:
        raise DataError(
            f"unknown source kind {kind!r}; choose one of: {', '.join(READERS)}"
        ) from None
    return reader(Path(path), name)
