"""Atomic output: complete or absent, never truncated, with the usual file mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from covid_cxr.fileio import atomic_open, atomic_write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "rows.csv", "complete\n")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_results_get_the_mode_the_umask_allows(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
