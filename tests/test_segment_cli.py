"""`covid-cxr segment` and `segment-evaluate` with the shipped segmenter on real radiographs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import require
from covid_cxr import RESEARCH_NOTICE
from covid_cxr.cli import main
from covid_cxr.data.masks import MaskRecord, write_mask_manifest
from covid_cxr.segmentation import LungSegmenter
from covid_cxr.segmentation.segmenter import DEFAULT_SEGMENTER
from imaging_helpers import truncated

REAL = (
    "jsrt/images/JPCLN009.png",  # 512 px grey PNG
    "openist-normal/images/1-10-500-500-100.jpg",  # 500 px wide grey JPEG
    "covid-chestxray-dataset/images/0a7faa2a.jpg",  # COVID-19, RGB JPEG
)


@pytest.fixture(scope="module")
def shipped() -> Path:
    require(DEFAULT_SEGMENTER.is_file(), f"shipped segmenter {DEFAULT_SEGMENTER} missing")
    return DEFAULT_SEGMENTER


@pytest.fixture(scope="module")
def scans(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real radiographs plus a truncated JPEG, a text file named .png and an empty file."""
    root = tmp_path_factory.mktemp("scans")
    for name in REAL:
        (root / Path(name).name).write_bytes((datasets / name).read_bytes())
    jpeg = (datasets / REAL[1]).read_bytes()
    (root / "truncated.jpg").write_bytes(truncated(jpeg))
    (root / "notes.png").write_text("this is not a radiograph\n")
    (root / "empty.png").write_bytes(b"")
    return root


def test_segment_writes_a_mask_per_radiograph_at_its_size(
    shipped: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "masks"
    code = main(["segment", str(scans), "--out", str(out), "--overlay"])
    captured = capsys.readouterr()
    assert code == 1  # three inputs are broken
    for name in REAL:
        source = Image.open(scans / Path(name).name)
        mask = Image.open(out / f"{Path(name).stem}.png")
        assert mask.mode == "L" and mask.size == source.size
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) <= {0, 255}
        assert 0.12 < (pixels == 255).mean() < 0.6, name  # lungs: a plausible share
        overlay = Image.open(out / f"{Path(name).stem}.overlay.png")
        assert overlay.mode == "RGB" and overlay.size == source.size
    for broken, reason in (
        ("truncated.jpg", "truncated"),
        ("notes.png", "not a PNG"),
        ("empty.png", "empty"),
    ):
        assert broken in captured.err and reason in captured.err
        assert not (out / f"{Path(broken).stem}.png").exists()
    assert "3 segmented, 3 failed" in captured.err
    assert RESEARCH_NOTICE in captured.err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_segment_reports_missing_paths(shipped: Path, tmp_path: Path, capsys) -> None:
    assert main(["segment", str(tmp_path / "nothing.png"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_lung_segmenter_api_and_no_torch(shipped: Path, datasets: Path) -> None:
    """The result is typed; segmenting imports no torch (the light inference environment)."""
    code = f"""
import sys
from covid_cxr.segmentation import LungSegmenter
from covid_cxr.imaging import read_radiograph
s = LungSegmenter()
pixels = read_radiograph({str(datasets / REAL[0])!r}).pixels
lungs = s.segment(pixels)
assert lungs.mask.shape == pixels.shape, lungs.mask.shape
assert lungs.components == 2, lungs.components
top, left, bottom, right = lungs.bbox
assert 0 <= top < bottom <= pixels.shape[0] and 0 <= left < right <= pixels.shape[1]
assert 0.15 < lungs.area_fraction < 0.5, lungs.area_fraction
assert "torch" not in sys.modules
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    segmenter = LungSegmenter(shipped)
    assert segmenter.info.metadata["task"] == "segmentation"
    with pytest.raises(ValueError, match="grayscale"):
        segmenter.segment(np.zeros((4, 4, 3), np.float32))


def test_segment_evaluate_writes_a_report(shipped: Path, datasets: Path, tmp_path: Path) -> None:
    records = [
        MaskRecord(
            datasets / "jsrt/images/JPCLN009.png",
            datasets / "jsrt/masks/JPCLN009.png",
            "jsrt",
            "jsrt:JPCLN009",
            "test",
        ),
        MaskRecord(
            datasets / "jsrt/images/JPCLN010.png",
            datasets / "jsrt/masks/JPCLN010.png",
            "jsrt",
            "jsrt:JPCLN010",
            "test",
        ),
    ]
    manifest = write_mask_manifest(tmp_path / "m.csv", records, datasets)
    out = tmp_path / "report"
    args = ["segment-evaluate", "--data", str(manifest), "--out", str(out), "--resamples", "50"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    by_source = {s["source"]: s for s in metrics["summaries"]}
    assert by_source["jsrt"]["n"] == 2 and by_source["all"]["patients"] == 2
    assert 0.5 < by_source["jsrt"]["mean"] <= 1.0
    assert 0.5 < by_source["jsrt"]["area_ratio"] < 1.5
    assert by_source["jsrt"]["ci_low"] <= by_source["jsrt"]["mean"] <= by_source["jsrt"]["ci_high"]
    assert (out / "report.md").read_text().startswith("# Lung segmenter")
    assert (out / "dice.png").is_file() and (out / "report.html").is_file()


def test_predict_refuses_the_segmenter(shipped: Path, datasets: Path, capsys) -> None:
    """The segmenter ships beside the classifier; predicting with it is a clear usage error."""
    code = main(["predict", str(datasets / REAL[0]), "--model", str(shipped)])
    assert code == 2
    assert "not a COVID-19 classifier" in capsys.readouterr().err
