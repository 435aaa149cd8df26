"""The input gate as users meet it: `covid-cxr predict` rows and summary, and the REST API's
422 `out_of_scope` answer from a real server, `covid-cxr evaluate`'s list of refused files."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from covid_cxr.cli import main
from covid_cxr.gate import oos
from imaging_helpers import make_dicom
from service_helpers import Server, shared_server

NOT_FRONTAL = "out of scope: not a frontal chest radiograph"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def chest(datasets: Path) -> Path:
    return sorted((datasets / "nih-chestxray8-subset" / "No_Finding").glob("*.png"))[5]


@pytest.fixture(scope="module")
def folder(datasets: Path, chest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real radiographs, a letter, a lateral view, a CT-labelled DICOM and a chest DICOM
    of a patient older than any in training."""
    root = tmp_path_factory.mktemp("uploads")
    shutil.copy(chest, root / "a-chest.png")
    kaggle = sorted((datasets / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))[0]
    shutil.copy(kaggle, root / "b-chest.jpeg")
    (root / "c-letter.png").write_bytes(_png(oos.document(np.random.default_rng(11))))
    lateral = datasets / "covid-chestxray-dataset" / "images" / "nejmoa2001191_f1-L.jpeg"
    shutil.copy(lateral, root / "d-lateral.jpeg")
    pixels = np.asarray(Image.open(chest).convert("L"))
    (root / "e-scan.dcm").write_bytes(make_dicom(pixels, Modality="CT"))
    (root / "f-old.dcm").write_bytes(make_dicom(pixels, PatientAge="099Y", ViewPosition="PA"))
    return root


def test_predict_cli_gives_refused_files_a_reason_and_no_probability(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(folder), "--format", "csv"]) == 1
    captured = capsys.readouterr()
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(captured.out))}
    for name in ("a-chest.png", "b-chest.jpeg", "f-old.dcm"):
        assert rows[name]["error"] == "" and 0 <= float(rows[name]["probability"]) <= 1
    for name in ("c-letter.png", "d-lateral.jpeg"):
        assert rows[name]["error"].startswith(NOT_FRONTAL), rows[name]
        assert rows[name]["probability"] == rows[name]["label"] == ""
    assert rows["e-scan.dcm"]["error"].startswith("out of scope: wrong modality (CT)")
    assert "3 predicted, 3 failed (3 out of scope: not frontal chest radiographs)" in captured.err
    assert "f-old.dcm: warning: patient age 99 years is outside the ages seen" in captured.err
    assert "c-letter.png: out of scope" in captured.err


def test_no_gate_scores_everything_for_research(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(folder), "--format", "csv", "--no-gate"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and all(r["error"] == "" for r in rows)


def test_gate_switch_through_the_environment(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COVID_CXR_GATE", "off")
    assert main(["predict", str(folder / "c-letter.png"), "--format", "csv"]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_api_answers_422_out_of_scope(request: pytest.FixtureRequest, folder: Path) -> None:
    server: Server = shared_server(request)
    with server.client() as client:
        for name, reason in (
            ("c-letter.png", NOT_FRONTAL),
            ("d-lateral.jpeg", NOT_FRONTAL),
            ("e-scan.dcm", "out of scope: wrong modality (CT)"),
        ):
            files = {"file": (name, (folder / name).read_bytes())}
            response = client.post("/api/v1/predict", files=files)
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "out_of_scope"
            assert reason in error["message"] and name in error["message"]
            assert "probability" not in response.json()
        old = client.post(
            "/api/v1/predict", files={"file": ("f-old.dcm", (folder / "f-old.dcm").read_bytes())}
        )
        assert old.status_code == 200, old.text
        assert "patient age 99 years" in old.json()["warnings"][0]
        batch = [("files", (n, (folder / n).read_bytes())) for n in ("a-chest.png", "c-letter.png")]
        answer = client.post("/api/v1/predict/batch", files=batch).json()
        assert answer["failed"] == 1
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


@pytest.mark.slow
def test_serve_no_gate_scores_everything(folder: Path, tmp_path: Path) -> None:
    from covid_cxr.service.settings import ServiceSettings
    from server_launcher import start_server

    assert ServiceSettings().gate
    assert not ServiceSettings.from_env({"COVID_CXR_GATE": "off"}).gate
    running = start_server(["--no-gate"], tmp_path / "server.log")
    try:
        files = {"file": ("c-letter.png", (folder / "c-letter.png").read_bytes())}
        response = httpx.post(f"{running.url}/api/v1/predict", files=files, timeout=30)
        assert response.status_code == 200, response.text
        assert 0.0 <= response.json()["probability"] <= 1.0
    finally:
        running.stop()


def test_evaluate_lists_refused_files_with_their_reason(
    datasets: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital = tmp_path / "hospital"
    covid = sorted((datasets / "covid-19-image-repository" / "png").glob("*.png"))[:4]
    normal = sorted((datasets / "nih-chestxray8-subset" / "No_Finding").glob("*.png"))[:4]
    for label, paths in (("covid", covid), ("normal", normal)):
        (hospital / label).mkdir(parents=True)
        for path in paths:
            (hospital / label / path.name).symlink_to(path)
    (hospital / "normal" / "letter.png").symlink_to(folder / "c-letter.png")
    out = tmp_path / "out"
    args = ["--data", hospital, "--out", out, "--cam-errors", "0", "--bootstrap", "50"]
    main(["evaluate", *map(str, args)])
    capsys.readouterr()
    result = json.loads((out / "metrics.json").read_text())
    assert result["data"]["scored"] == 8
    (refused,) = result["data"]["unreadable"]
    assert refused["path"].endswith("letter.png") and refused["reason"].startswith(NOT_FRONTAL)
    report = (out / "report.md").read_text()
    assert "refused by the input gate: 1" in report and NOT_FRONTAL in report
