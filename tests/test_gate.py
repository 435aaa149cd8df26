"""The input gate: DICOM header rules on DICOMs built from a real radiograph, the shipped image
classifier on real radiographs of every source against out-of-scope pictures, and the
Predictor switch. CLI, API and page tests are in test_gate_interfaces.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.errors import OutOfScopeError, RadiographError
from covid_cxr.gate import GATE_ENV, InputGate, gate_enabled, oos
from covid_cxr.gate.header import age_years
from covid_cxr.imaging import read_radiograph
from covid_cxr.inference.predictor import Predictor
from imaging_helpers import make_dicom

SOURCES = {
    "hannover": "covid-19-image-repository/png/*.png",
    "nih": "nih-chestxray8-subset/No_Finding/*.png",
    "kaggle": "chest_xray/test/NORMAL/*.jpeg",
    "jsrt": "jsrt/images/*.png",
    "openist": "openist-normal/images/*.jpg",
}


@pytest.fixture(scope="module")
def gate() -> InputGate:
    return InputGate()


@pytest.fixture(scope="module")
def chest(datasets: Path) -> np.ndarray:
    """A real NIH adult radiograph as 8-bit pixels, to build DICOMs from."""
    path = sorted((datasets / "nih-chestxray8-subset" / "No_Finding").glob("*.png"))[3]
    return np.asarray(Image.open(path).convert("L"))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def dicom(pixels: np.ndarray, **attributes: str) -> bytes:
    return make_dicom(pixels, **attributes)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"Modality": "CT"}, "out of scope: wrong modality (CT)"),
        ({"Modality": "MR"}, "out of scope: wrong modality (MR)"),
        ({"Modality": "US"}, "out of scope: wrong modality (US)"),
        ({"Modality": "OT"}, "out of scope: wrong modality (OT)"),
        ({"ViewPosition": "LL"}, "out of scope: lateral view (LL)"),
        ({"ViewPosition": "RL"}, "out of scope: lateral view (RL)"),
        ({"ViewPosition": "LATERAL"}, "out of scope: lateral view (LATERAL)"),
        ({"BodyPartExamined": "ABDOMEN"}, "out of scope: body part ABDOMEN is not CHEST"),
        ({"BodyPartExamined": "HAND", "Modality": "CR"}, "body part HAND is not CHEST"),
    ],
)
def test_header_rules_refuse(
    gate: InputGate, chest: np.ndarray, attributes: dict[str, str], reason: str
) -> None:
    radiograph = read_radiograph(dicom(chest, **attributes), name="study.dcm")
    with pytest.raises(OutOfScopeError) as caught:
        gate.check(radiograph)
    assert reason in caught.value.reason
    assert caught.value.source == "study.dcm"
    assert "--no-gate" in caught.value.hint
    assert isinstance(caught.value, RadiographError)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize(
    "attributes",
    [
        {"Modality": "CR", "ViewPosition": "PA", "BodyPartExamined": "CHEST"},
        {"Modality": "DX", "ViewPosition": "AP", "BodyPartExamined": "chest "},
        {},  # missing attributes are not refusals
    ],
)
def test_header_rules_accept_frontal_chest(
    gate: InputGate, chest: np.ndarray, attributes: dict[str, str]
) -> None:
    result = gate.check(read_radiograph(dicom(chest, **attributes)))
    assert result.score >= gate.info.threshold
    assert result.warnings == ()


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize(
    ("age", "years", "warned"),
    [
        ("045Y", 45.0, False),
        ("001Y", 1.0, False),
        ("094Y", 94.0, False),
        ("097Y", 97.0, True),
        ("006M", 0.5, True),
        ("003W", 3 * 7 / 365.25, True),
        ("abc", None, False),
    ],
)
def test_age_outside_training_is_a_warning_not_a_refusal(
    gate: InputGate, chest: np.ndarray, age: str, years: float | None, warned: bool
) -> None:
    radiograph = read_radiograph(dicom(chest, PatientAge=age))
    assert age_years(radiograph.dataset) == (pytest.approx(years) if years else None)
    result = gate.check(radiograph)
    assert bool(result.warnings) == warned
    if warned:
        assert "outside the ages seen in training (1 to 94 years)" in result.warnings[0]


def frontal_ieee8023(datasets: Path) -> list[Path]:
    folder = datasets / "covid-chestxray-dataset"
    with (folder / "metadata.csv").open(newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r["view"] in ("PA", "AP")]
    paths = [folder / r["folder"] / r["filename"] for r in rows]
    return sorted(p for p in paths if p.is_file())


@pytest.mark.parametrize("source", [*sorted(SOURCES), "ieee8023"])
def test_real_radiographs_of_every_source_pass(
    gate: InputGate, datasets: Path, source: str
) -> None:
    if source == "ieee8023":
        paths = frontal_ieee8023(datasets)[-8:]
    else:
        paths = sorted(datasets.glob(SOURCES[source]))[-8:]
    assert len(paths) == 8, f"{source}: not enough images"
    scores = [gate.check(read_radiograph(path)).score for path in paths]
    assert min(scores) >= gate.info.threshold


def out_of_scope_pictures(datasets: Path) -> dict[str, Image.Image]:
    """One of each kind, made fresh (seed 7, not the training seed) or held-out on disk."""
    rng = np.random.default_rng(7)
    pictures = {kind: make(rng) for kind, make in oos.SYNTHETIC.items()}
    radiograph = read_radiograph(sorted(datasets.glob(SOURCES["jsrt"]))[0]).pixels
    for kind, _how, image in oos.radiograph_variants(radiograph, rng):
        pictures[kind] = image
    lateral = datasets / "covid-chestxray-dataset" / "images" / "nejmoa2001191_f1-L.jpeg"
    pictures["lateral"] = Image.open(lateral)
    return pictures


def test_out_of_scope_pictures_are_refused(gate: InputGate, datasets: Path) -> None:
    for kind, image in out_of_scope_pictures(datasets).items():
        radiograph = read_radiograph(png(image), name=f"{kind}.png")
        with pytest.raises(OutOfScopeError, match="not a frontal chest radiograph") as caught:
            gate.check(radiograph)
        assert caught.value.source == f"{kind}.png", kind


def test_predictor_refuses_and_the_switch_bypasses(
    datasets: Path, chest: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = png(oos.document(np.random.default_rng(3)))
    predictor = Predictor()
    with pytest.raises(OutOfScopeError, match=r"^letter\.png: out of scope: not a frontal chest"):
        predictor.predict(page, name="letter.png")
    with pytest.raises(OutOfScopeError, match=r"wrong modality \(CT\)"):
        predictor.predict(dicom(chest, Modality="CT"))
    result = predictor.predict(dicom(chest, PatientAge="099Y"))
    assert result.gate_score is not None and result.gate_score >= predictor.gate.info.threshold
    assert "patient age 99 years" in result.warnings[0]
    assert result.timings_ms["gate"] > 0

    bypassed = Predictor(gate=False)
    assert bypassed.gate is None and "gate OFF" in repr(bypassed)
    assert 0.0 <= bypassed.predict(page).probability <= 1.0
    assert bypassed.predict(page).gate_score is None

    monkeypatch.setenv(GATE_ENV, "off")
    assert not gate_enabled(None) and Predictor().gate is None
    assert gate_enabled(True)
    monkeypatch.setenv(GATE_ENV, "on")
    assert gate_enabled(None)


def test_a_missing_gate_model_is_a_clear_error(tmp_path: Path) -> None:
    from covid_cxr.errors import ModelError

    with pytest.raises(ModelError, match="input gate model is missing"):
        InputGate(tmp_path / "nothing.onnx")
