"""The original project's folder layout, `Dataset/Train|Validation/COVID|Normal`, from a manifest.

Files are copied, not linked: the folder is meant to be zipped or moved to another machine
(the original Keras notebook read it with flow_from_directory), and symlinks would break there.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from covid_cxr.data.manifest import ManifestRow
from covid_cxr.errors import DataError

FOLDERS = {"train": "Train", "val": "Validation", "test": "Test", "external": "External"}


def export_folders(rows: Iterable[ManifestRow], destination: Path) -> Counter[str]:
    """Copy images to destination/Dataset/<Split>/<label>/<source>-<file name>.

    Labels keep their names ("COVID", "Normal", "Pneumonia"...). Refuses a non-empty target
    so an old export is never silently mixed with a new one. Returns counts per folder.
    """
    root = destination / "Dataset"
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: already exists and is not empty; remove it or export elsewhere")
    counts: Counter[str] = Counter()
    for row in rows:
        folder = root / FOLDERS[row.split] / row.label
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{row.source}-{row.path.name}"
        if target.exists():  # two files of one name in different sub-folders of a source
            target = target.with_stem(f"{target.stem}-{row.sha256[:8]}")
        shutil.copy2(row.path, target)
        counts[f"{FOLDERS[row.split]}/{row.label}"] += 1
    return counts
