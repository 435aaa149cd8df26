"""`covid-cxr evaluate` end to end on a small real subset (Hannover COVID-19 archive and NIH
adult radiographs) with a small seed-cnn checkpoint: report, figures, metrics.json, operating
points chosen on validation data and stored in the model, unreadable files listed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.cli import main
from covid_cxr.data.manifest import ManifestRow, file_sha256, write_manifest
from covid_cxr.errors import DataError
from covid_cxr.evaluation.evaluate import _confident_errors, select_split
from covid_cxr.evaluation.scoring import Scored
from covid_cxr.evaluation.thresholds import youden_threshold
from covid_cxr.imaging import PreprocessConfig
from covid_cxr.inference.predictor import Predictor
from covid_cxr.models import create
from covid_cxr.models.checkpoint import ModelInfo, load_checkpoint, save_checkpoint

FIGURES = ("roc.png", "pr.png", "reliability.png", "confusion.png", "errors.png")
FAST = ["--bootstrap", "200", "--threads", "2", "--workers", "2"]


def _real_rows(datasets: Path) -> list[ManifestRow]:
    """~12 Hannover COVID-19 images of 6 patients and 16 NIH images, split val/test by patient."""
    hannover = datasets / "covid-19-image-repository"
    with (hannover / "data.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    patients = sorted({r["patient_id"] for r in table})[:6]
    picked = [r for r in table if r["patient_id"] in patients][:12]
    rows = [
        (hannover / "png" / f"{r['image_id']}.png", "COVID", "hannover", r["patient_id"])
        for r in picked
    ]
    nih = datasets / "nih-chestxray8-subset"
    for folder, label, count in (("No_Finding", "Normal", 12), ("Pneumonia", "Pneumonia", 4)):
        for path in sorted((nih / folder).glob("*.png"))[:count]:
            rows.append((path, label, "nih", path.stem.split("_")[0]))
    order = {p: i for i, p in enumerate(sorted({(s, pid) for _, _, s, pid in rows}))}
    return [
        ManifestRow(
            path=path,
            label=label,
            source=source,
            patient_id=f"{source}:{pid}",
            view="PA",
            sha256=file_sha256(path),
            split="val" if order[(source, pid)] % 2 else "test",
        )
        for path, label, source, pid in rows
    ]


def _broken(folder: Path) -> Path:
    path = folder / "broken.png"
    path.write_bytes(b"this is a text file with a .png name")
    return path


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An untrained seed-cnn at 64 px: its scores spread enough to produce errors of both kinds."""
    torch.manual_seed(0)
    path = tmp_path / "run" / "best.pt"
    info = ModelInfo(
        name="seed-cnn",
        options={"size": 64},
        preprocess=PreprocessConfig(size=64, crop=0.9),
        version="test",
    )
    save_checkpoint(path, create("seed-cnn", size=64), info)
    return path


@pytest.fixture
def manifest(datasets: Path, tmp_path: Path) -> tuple[Path, list[ManifestRow]]:
    rows = _real_rows(datasets)
    broken = _broken(tmp_path)
    rows.append(ManifestRow(broken, "Normal", "nih", "nih:broken", "PA", "", "test"))
    return write_manifest(tmp_path / "manifest.csv", rows, root=datasets), rows


def _run(*args: object) -> int:
    return main(["evaluate", *(str(a) for a in args)])


@pytest.mark.slow
def test_evaluate_manifest_end_to_end(
    checkpoint: Path, manifest: tuple[Path, list[ManifestRow]], tmp_path: Path
) -> None:
    manifest_path, rows = manifest
    out = tmp_path / "report"
    code = _run(
        "--model", checkpoint.parent, "--data", manifest_path, "--out", out,
        "--cam-errors", "4", "--store-thresholds", "--operating-point", "youden", *FAST,
    )  # fmt: skip
    assert code == 0

    for name in ("report.md", "report.html", "metrics.json", *FIGURES):
        assert (out / name).is_file(), name
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300

    result = json.loads((out / "metrics.json").read_text())
    test_rows = [r for r in rows if r.split == "test"]
    data = result["data"]
    assert data["split"] == "test"
    assert data["listed"] == len(test_rows) and data["scored"] == len(test_rows) - 1
    (unreadable,) = data["unreadable"]
    assert unreadable["path"].endswith("broken.png") and unreadable["reason"]

    # Thresholds were chosen on the val split: recompute Youden's J from the model's scores.
    val_rows = [r for r in rows if r.split == "val"]
    predictor = Predictor(checkpoint, threads=2)
    scores = np.array([p.probability for p in predictor.predict_batch([r.path for r in val_rows])])
    expected = youden_threshold(np.array([r.target for r in val_rows]), scores)
    points = result["operating_points"]
    assert set(points) == {"default", "youden", "sensitivity_95", "youden_balanced"}
    assert points["youden"]["threshold"] == pytest.approx(expected)
    assert "val split" in points["youden"]["origin"]
    assert result["validation"]["scored"] == len(val_rows)
    assert result["validation"]["overlap_with_evaluated"] == 0

    overall = result["overall"]
    assert overall["n"] == data["scored"]
    for point in overall["operating_points"].values():
        assert sum(point["confusion"].values()) == overall["n"]
    assert overall["scores"]["roc_auc"]["ci"] is not None
    assert set(result["per_source"]) == {"hannover", "nih"}
    hannover = result["per_source"]["hannover"]["operating_points"]["youden"]["metrics"]
    assert hannover["specificity"] == {
        "value": None,
        "ci": None,
        "reason": "no non-COVID images",
        "ci_resamples": None,
    }
    assert len(result["errors"]) == 4
    assert {e["error"] for e in result["errors"]} <= {"false positive", "false negative"}
    assert "Grad-CAM" in result["errors_note"]

    # Stored with the model, and used by inference.
    _, info = load_checkpoint(checkpoint)
    assert info.operating_point == "youden"
    assert info.thresholds == pytest.approx({k: v["threshold"] for k, v in points.items()})
    assert Predictor(checkpoint).threshold == pytest.approx(expected)

    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for text in (markdown, page):
        assert RESEARCH_NOTICE in text
        assert "broken.png" in text
        assert "sensitivity_95" in text
    assert "![ROC curves](roc.png)" in markdown
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert 'src="roc.png"' not in page


@pytest.mark.slow
def test_evaluate_labelled_csv_uses_the_thresholds_stored_in_the_model(
    datasets: Path, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    model = tmp_path / "model.pt"
    info = ModelInfo(
        name="seed-cnn",
        options={"size": 64},
        preprocess=PreprocessConfig(size=64),
        thresholds={"default": 0.5, "youden": 0.47},
        operating_point="youden",
    )
    save_checkpoint(model, create("seed-cnn", size=64), info)
    rows = _real_rows(datasets)
    csv_path = tmp_path / "mine" / "labels.csv"
    csv_path.parent.mkdir()
    broken = _broken(csv_path.parent)
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows([str(r.path), r.label, r.patient_id] for r in rows)
        writer.writerow([broken.name, "Normal", ""])  # relative to the CSV
        writer.writerow(["gone.png", "COVID", ""])  # not on disk: left out by the reader
    out = tmp_path / "out"

    assert _run("--model", model, "--data", csv_path, "--out", out, "--cam-errors", "2", *FAST) == 0

    result = json.loads((out / "metrics.json").read_text())
    assert result["data"]["split"] == "all"
    assert result["data"]["listed"] == len(rows) + 1
    assert [u["path"] for u in result["data"]["unreadable"]] == [str(broken.resolve())]
    (left_out,) = result["data"]["excluded_by_reader"]
    assert "gone.png" in left_out["item"]
    assert result["validation"] is None
    assert {k: v["threshold"] for k, v in result["operating_points"].items()} == {
        "default": 0.5,
        "youden": 0.47,
    }
    assert result["primary_operating_point"] == "youden"
    assert result["per_source"] == {}  # one source: the CSV
    assert "gone.png" in (out / "report.md").read_text()


@pytest.mark.slow
def test_evaluate_labelled_folder(checkpoint: Path, datasets: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hospital"
    for row in _real_rows(datasets)[::2]:
        target = folder / row.label.lower() / row.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(row.path)
    out = tmp_path / "out"
    args = ("--model", checkpoint, "--data", folder, "--out", out, "--cam-errors", "0")
    assert _run(*args, "--bootstrap", "50", "--threads", "2") == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["data"]["labels"] == {"COVID": 6, "Normal": 6, "Pneumonia": 2}
    assert "errors" not in result["figures"]


def test_storing_thresholds_without_validation_data_is_refused(
    checkpoint: Path, datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label\n{_real_rows(datasets)[0].path},COVID\n")
    code = _run("--model", checkpoint, "--data", csv_path, "--out", tmp_path, "--store-thresholds")
    assert code == 2
    assert "--store-thresholds needs validation data" in capsys.readouterr().err


def _row(split: str, target: int = 0) -> ManifestRow:
    label = "COVID" if target else "Normal"
    return ManifestRow(Path(f"/x/{split}.png"), label, "s", "p", "PA", "", split)


def test_split_selection() -> None:
    rows = [_row("train"), _row("val"), _row("test"), _row("test")]
    assert select_split(rows, None) == (rows[2:], "test")
    assert select_split(rows, "all") == (rows, "all")
    assert select_split([_row("external")], None)[1] == "all"
    with pytest.raises(DataError, match=r"no rows in split 'external'.*test \(2\)"):
        select_split(rows, "external")


def test_confident_errors_take_the_most_confident_of_each_kind() -> None:
    rows = [_row("test", t) for t in (0, 0, 0, 1, 1, 1)]
    scored = Scored(rows, np.array([0.9, 0.6, 0.2, 0.1, 0.45, 0.8]))
    # False positives (non-COVID >= 0.5): 0.9, 0.6; false negatives (COVID < 0.5): 0.1, 0.45.
    assert _confident_errors(scored, 0.5, 2) == [0, 3]
    assert _confident_errors(scored, 0.5, 4) == [0, 1, 3, 4]
    assert _confident_errors(scored, 0.5, 12) == [0, 1, 3, 4]
    assert _confident_errors(scored, 0.95, 3) == [3, 4, 5]  # no false positives: FNs fill in


def _brightness_onnx(path: Path, info: ModelInfo) -> Path:
    """A hand-built ONNX model, logit = 10 (mean pixel - 0.45), with covid-cxr metadata."""
    import onnx
    from onnx import TensorProto, helper

    from covid_cxr.inference.metadata import INPUT, LOGIT, set_metadata

    size = info.preprocess.size
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", [INPUT], ["mean"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Sub", ["mean", "shift"], ["centred"]),
            helper.make_node("Mul", ["centred", "scale"], [LOGIT]),
        ],
        "brightness",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info(LOGIT, TensorProto.FLOAT, ["batch"])],
        [
            helper.make_tensor("shift", TensorProto.FLOAT, [], [0.45]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [10.0]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(proto, info, None)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def test_evaluate_onnx_model_and_store_thresholds_in_its_metadata(
    manifest: tuple[Path, list[ManifestRow]], tmp_path: Path
) -> None:
    from covid_cxr.inference.metadata import read_metadata

    info = ModelInfo(name="brightness", preprocess=PreprocessConfig(size=32), version="onnx")
    model = _brightness_onnx(tmp_path / "model.onnx", info)
    manifest_path, _ = manifest
    out = tmp_path / "out"
    args = ("--model", model, "--data", manifest_path, "--out", out, "--cam-errors", "2")
    assert _run(*args, "--store-thresholds", "--operating-point", "sensitivity_95", *FAST) == 0

    result = json.loads((out / "metrics.json").read_text())
    assert result["model"]["runtime"] == "onnx"
    assert result["errors_note"].startswith("No heat maps")
    stored, _ = read_metadata(model)
    assert stored.operating_point == "sensitivity_95"
    chosen = result["operating_points"]["sensitivity_95"]["threshold"]
    assert stored.threshold == pytest.approx(chosen)
    assert Predictor(model).threshold == pytest.approx(chosen)
    # The model still runs after its metadata was rewritten.
    assert result["data"]["scored"] == result["overall"]["n"] > 0


def test_evaluating_an_onnx_model_and_storing_its_thresholds_never_imports_torch(
    manifest: tuple[Path, list[ManifestRow]], tmp_path: Path
) -> None:
    info = ModelInfo(name="brightness", preprocess=PreprocessConfig(size=32), version="onnx")
    model = _brightness_onnx(tmp_path / "model.onnx", info)
    manifest_path, _ = manifest
    script = (
        "import sys; from covid_cxr.cli import main; "
        f"code = main(['evaluate', '--model', {str(model)!r}, '--data', {str(manifest_path)!r}, "
        f"'--out', {str(tmp_path / 'out')!r}, '--store-thresholds', '--bootstrap', '20']); "
        "print('torch' in sys.modules); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
