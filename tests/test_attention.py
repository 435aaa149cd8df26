"""The share of Grad-CAM mass inside the lungs, by hand, and through `covid-cxr evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from covid_cxr.cli import main
from covid_cxr.data.manifest import ManifestRow
from covid_cxr.evaluation.attention import cam_share_in_lungs, summarise


def test_share_counts_mass_on_lung_pixels_of_the_cropped_box() -> None:
    lungs = np.zeros((100, 100), dtype=bool)
    lungs[:, :50] = True  # the left half is lung
    left = np.zeros((4, 4), np.float32)
    left[:, :2] = 1.0
    # Bilinear upsampling blurs the map's edge a little across the lung border.
    assert cam_share_in_lungs(left, lungs, crop=1.0) > 0.9
    assert cam_share_in_lungs(left[:, ::-1].copy(), lungs, crop=1.0) < 0.1
    assert cam_share_in_lungs(np.ones((4, 4), np.float32), lungs, crop=1.0) == 0.5
    # With a centre crop the map covers only the middle 50x50: still half on lung.
    assert cam_share_in_lungs(np.ones((4, 4), np.float32), lungs, crop=0.5) == 0.5
    assert math.isnan(cam_share_in_lungs(np.zeros((4, 4), np.float32), lungs, crop=1.0))


def test_summary_per_source_skips_unmeasured_images() -> None:
    rows = [
        ManifestRow(Path(f"{i}.png"), "Normal", source, f"p{i}", "", "", "test")
        for i, source in enumerate(["a", "a", "b", "b"])
    ]
    summary = summarise(np.array([0.2, 0.4, 0.9, np.nan]), rows, resamples=200, seed=0)
    assert abs(summary["a"].value - 0.3) < 1e-12
    assert summary["b"].value == 0.9 and summary["all"].value == 0.5
    lo, hi = summary["all"].ci
    assert lo <= 0.5 <= hi


def test_evaluate_reports_cam_inside_the_lungs_per_source(datasets: Path, tmp_path: Path) -> None:
    folder = tmp_path / "site"
    for label, images in (
        ("covid", sorted((datasets / "covid-19-image-repository/png").glob("*.png"))[:3]),
        ("normal", sorted((datasets / "jsrt/images").glob("*.png"))[:3]),
    ):
        (folder / label).mkdir(parents=True)
        for image in images:
            (folder / label / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    assert main(["evaluate", "--data", str(folder), "--out", str(out), "--bootstrap", "50"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    share = result["cam_in_lungs"]["all"]
    assert 0.0 <= share["value"] <= 1.0 and share["ci"] is not None
    assert "Grad-CAM mass inside the lungs" in (out / "report.md").read_text()
    assert (
        main(
            ["evaluate", "--data", str(folder), "--out", str(tmp_path / "o2"), "--no-cam-in-lungs"]
        )
        == 0
    )
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["cam_in_lungs"] == {}
