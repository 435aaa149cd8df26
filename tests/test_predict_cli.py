"""`covid-cxr predict` over a folder of real radiographs with broken files mixed in."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.cli import main
from covid_cxr.inference.predictor import Predictor
from imaging_helpers import make_dicom, truncated
from inference_helpers import build, real_radiographs

BROKEN = {
    "truncated.jpg": "truncated",
    "notes.png": "not a png",
    "empty.png": "empty",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("efficientnet-lite0", tmp_path_factory.getbasetemp()).onnx


@pytest.fixture(scope="module")
def folder(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real PNG, JPEG and DICOM radiographs in nested folders, plus three broken files."""
    real = real_radiographs(datasets)
    root = tmp_path_factory.mktemp("scans")
    (root / "ward-a").mkdir()
    (root / "ward-b" / "dicom").mkdir(parents=True)
    for path in real["png"][:3]:
        shutil.copy(path, root / "ward-a" / path.name)
    for path in real["jpeg"][:3]:
        shutil.copy(path, root / "ward-b" / path.name)
    pixels = np.asarray(Image.open(real["png"][4]).convert("L"))
    (root / "ward-b" / "dicom" / "IM0001").write_bytes(make_dicom(pixels))  # no extension
    (root / "ward-a" / "truncated.jpg").write_bytes(truncated(real["jpeg"][5].read_bytes()))
    (root / "ward-a" / "notes.png").write_text("Patient notes, not an image.\n")
    (root / "ward-b" / "empty.png").write_bytes(b"")
    (root / "ward-b" / "README.txt").write_text("ignored by the folder walk\n")
    return root


def _good_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name not in BROKEN and p.suffix != ".txt"
    )


def test_folder_with_broken_files_predicts_the_good_ones_and_reports_the_rest(
    model: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "predictions.csv"
    code = main(
        ["predict", str(folder), "--model", str(model), "--output", str(out), "--batch-size", "3"]
    )
    err = capsys.readouterr().err
    assert code == 1  # some inputs failed
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == ["path", "probability", "label", "threshold", "model_version", "error"]
    by_name = {Path(r["path"]).name: r for r in rows}
    good = _good_files(folder)
    assert len(rows) == len(good) + len(BROKEN) == 10
    assert "README.txt" not in by_name
    # Good rows carry exactly what the Predictor says, in the order of the folder walk.
    predictor = Predictor(model)
    for path in good:
        row = by_name[path.name]
        expected = predictor.predict(path)
        assert row["error"] == ""
        assert float(row["probability"]) == pytest.approx(expected.probability, abs=1e-5)
        assert row["label"] == expected.label and float(row["threshold"]) == 0.5
        assert row["model_version"] == "test-efficientnet-lite0"
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    for name, reason in BROKEN.items():
        row = by_name[name]
        assert reason in row["error"].lower() and row["probability"] == row["label"] == ""
        assert f"{name}: " in err  # each failure is named on stderr with its reason
    assert "7 predicted, 3 failed, 1 non-image file(s) in folders ignored" in err
    assert RESEARCH_NOTICE in err  # stderr, so the CSV stays clean
    assert RESEARCH_NOTICE not in out.read_text()


def test_jsonl_and_table_outputs(
    model: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(folder), "--model", str(model), "--format", "jsonl"]) == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 10 and RESEARCH_NOTICE not in captured.out
    assert sum(r["error"] is None for r in records) == 7
    assert all(0.0 <= r["probability"] <= 1.0 for r in records if r["error"] is None)

    assert main(["predict", str(folder), "--model", str(model), "--workers", "1"]) == 1
    table = capsys.readouterr().out.splitlines()
    assert table[0] == RESEARCH_NOTICE
    assert "probability" in table[2] and "path" in table[2]
    errors = [line for line in table if "ERROR" in line]
    assert len(errors) == 3 and any("notes.png: " in line for line in errors)
    assert sum(("COVID-19" in line or "non-COVID" in line) for line in table[3:]) == 7


def test_globs_single_files_and_missing_paths(
    model: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pngs = str(folder / "**" / "*.png")
    missing = str(folder / "nope.png")
    code = main(["predict", pngs, missing, "--model", str(model), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 1
    assert rows[0]["path"] == missing and "no such file" in rows[0]["error"]
    assert {Path(r["path"]).suffix for r in rows[1:]} == {".png"}
    assert len(rows) == 1 + 3 + 2  # missing, three good PNGs, notes.png and empty.png

    one = next(iter(sorted((folder / "ward-b").glob("*.jp*g"))))
    assert main(["predict", str(one), "--model", str(model), "--format", "jsonl"]) == 0


def test_cam_overlays_at_the_radiographs_own_resolution(
    model: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cams = tmp_path / "cams"
    ward = folder / "ward-b"
    code = main(
        ["predict", str(ward), "--model", str(model), "--cam", str(cams), "--format", "jsonl"]
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # empty.png
    done = [r for r in records if r["error"] is None]
    assert len(done) == 4
    for record in done:
        overlay = Image.open(record["cam"])
        source = Image.open(record["path"]) if not record["path"].endswith("IM0001") else None
        assert overlay.mode == "RGB"
        if source is not None:
            assert overlay.size == source.size


def test_usage_errors_exit_2(
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("COVID_CXR_MODEL", raising=False)
    assert main(["predict", str(folder), "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "model not found" in capsys.readouterr().err
    monkeypatch.setenv("COVID_CXR_MODEL", str(tmp_path / "also-missing.onnx"))
    assert main(["predict", str(folder)]) == 2
    assert "$COVID_CXR_MODEL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(folder), "--batch-size", "0"])
    assert exited.value.code == 2


def test_the_installed_command_runs(model: Path, folder: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "covid_cxr.cli",
            "predict",
            str(folder / "ward-a"),
            "--model",
            str(model),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert len(list(csv.DictReader(io.StringIO(done.stdout)))) == 5
    assert "truncated.jpg: " in done.stderr
