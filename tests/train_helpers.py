"""Tiny real training sets for the training tests: adult COVID-19 radiographs from the Hannover
repository and adult NIH "No Finding" radiographs (both 448 px PNG, quick to decode), read by
the project's own source readers and split by patient."""

from __future__ import annotations

from pathlib import Path

from covid_cxr.data.manifest import ManifestRow, write_manifest
from covid_cxr.data.sources import open_source


def real_rows(datasets: Path, covid: int = 24, normal: int = 24) -> list[ManifestRow]:
    """`covid` + `normal` images; every third patient of each class goes to validation."""
    hannover = open_source("hannover", datasets / "covid-19-image-repository").read().records
    nih = open_source("nih", datasets / "nih-chestxray8-subset").read().records
    records = sorted(hannover, key=lambda r: r.path)[:covid]
    records += sorted((r for r in nih if r.label == "Normal"), key=lambda r: r.path)[:normal]
    val = set()
    for label in ("COVID", "Normal"):
        val |= set(sorted({r.patient_id for r in records if r.label == label})[1::3])
    return [
        ManifestRow(
            r.path,
            r.label,
            r.source,
            r.patient_id,
            r.view,
            "",
            "val" if r.patient_id in val else "train",
        )
        for r in records
    ]


def write_rows(path: Path, rows: list[ManifestRow], datasets: Path) -> Path:
    return write_manifest(path, rows, root=datasets)
