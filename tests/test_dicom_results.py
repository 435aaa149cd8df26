"""DICOM results (SR + Secondary Capture) from real radiographs: round trip through pydicom and
highdicom, UIDs, patient/study copied, references, new study for PNG, and `--dicom-out`."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from conftest import require
from covid_cxr import RESEARCH_NOTICE
from covid_cxr.dicom import build_results, result_files, write_results
from covid_cxr.dicom.capture import BANNER_TEXT
from covid_cxr.errors import RadiographError
from covid_cxr.explain.gradcam import overlay
from covid_cxr.inference.predictor import Prediction, Predictor
from imaging_helpers import make_dicom

HANNOVER = "covid-19-image-repository/png"
SYNTHETIC_PATIENT = {
    "PatientName": "Synthetic^Jürgen",  # non-ASCII: the character set travels too
    "PatientID": "SYN-0001",
    "PatientBirthDate": "19600101",
    "PatientSex": "O",
    "AccessionNumber": "SYNACC1",
    "StudyID": "SYN1",
    "StudyDate": "20200401",
    "StudyTime": "101500",
    "ReferringPhysicianName": "Synthetic^Referrer",
}
COPIED = list(SYNTHETIC_PATIENT)


@pytest.fixture(scope="module")
def hannover(datasets: Path) -> list[Path]:
    files = sorted((datasets / HANNOVER).glob("*.png"))
    require(len(files) >= 2, f"Hannover radiographs not found under {datasets / HANNOVER}")
    return files[:2]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


def dicom_of(png: Path, **extra: Any) -> bytes:
    """A DX DICOM of a real radiograph, with a synthetic patient in a study of its own."""
    pixels = np.asarray(Image.open(png).convert("L"))
    attributes = {
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "PatientOrientation": ["L", "F"],
        "SpecificCharacterSet": "ISO_IR 192",
        **SYNTHETIC_PATIENT,
        **extra,
    }
    return make_dicom(pixels, **attributes)


def predict(predictor: Predictor, source: bytes | Path, name: str) -> tuple[Prediction, Any]:
    prediction = predictor.predict(source, name=name, cam=True)
    assert prediction.cam is not None
    rgb = overlay(prediction.radiograph.pixels, prediction.cam, crop=predictor.info.preprocess.crop)
    return prediction, rgb


def content_items(items: Any) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    found = []
    for item in items:
        found.append(item)
        found += content_items(item.get("ContentSequence", []))
    return found


def by_meaning(sr: Dataset) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in content_items(sr.ContentSequence):
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            values.setdefault(meaning, []).append(item.TextValue)
        elif item.ValueType == "NUM":
            values[meaning] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            values[meaning] = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "IMAGE":
            values.setdefault("images", []).append(
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            )
    return values


def evidence_uids(sr: Dataset) -> set[tuple[str, str, str]]:
    found = set()
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for instance in series.ReferencedSOPSequence:
                found.add(
                    (
                        study.StudyInstanceUID,
                        series.SeriesInstanceUID,
                        instance.ReferencedSOPInstanceUID,
                    )
                )
    return found


def test_sr_and_sc_of_a_dicom_round_trip(
    predictor: Predictor, hannover: list[Path], tmp_path: Path
) -> None:
    data = dicom_of(hannover[0])
    source = pydicom.dcmread(io.BytesIO(data))
    prediction, rgb = predict(predictor, data, "hannover.dcm")
    header = prediction.radiograph.dataset
    point = predictor.operating_point
    results = build_results(
        prediction.radiograph, prediction, rgb, predictor.info, operating_point=point
    )
    sr_path, sc_path = write_results(results, tmp_path / "out", "hannover")
    assert (sr_path, sc_path) == result_files(tmp_path / "out", "hannover")
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes left nothing behind

    sr, sc = hd.sr.srread(sr_path), pydicom.dcmread(sc_path)
    assert hd.imread(sc_path).get_frame(1).shape == sc.pixel_array.shape
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPClassUID == Comprehensive3DSRStorage

    # Same study and patient as the input; new, distinct series and instances.
    for result in (sr, sc):
        assert result.StudyInstanceUID == header.StudyInstanceUID
        for keyword in COPIED:
            assert str(result.get(keyword)) == str(SYNTHETIC_PATIENT[keyword]), keyword
        assert result.ContentQualification == "RESEARCH"
    new_uids = [sr.SeriesInstanceUID, sc.SeriesInstanceUID, sr.SOPInstanceUID, sc.SOPInstanceUID]
    assert header.SOPInstanceUID == source.SOPInstanceUID
    old_uids = {header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID}
    assert len(set(new_uids)) == 4 and not set(new_uids) & old_uids

    # The SR: the finding, the numbers, the model, the notice, the source image.
    values = by_meaning(sr)
    assert values["Probability of COVID-19"] == pytest.approx(prediction.probability)
    assert values["Decision threshold"] == pytest.approx(predictor.threshold)
    verdict = "COVID-19 likely" if prediction.positive else "COVID-19 not likely"
    assert values["COVID-19"] == verdict
    assert set(values["Algorithm Name"]) == {predictor.info.name}
    assert set(values["Algorithm Version"]) == {predictor.info.version}
    assert f"operating point {point}" in values["Algorithm Parameters"]
    assert RESEARCH_NOTICE in values["Comment"]
    assert values["images"] == [header.SOPInstanceUID]
    source_uids = (header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
    assert source_uids in evidence_uids(sr)
    (group,) = sr.content.get_image_measurement_groups()
    assert group.source_images[0].referenced_sop_instance_uid == header.SOPInstanceUID

    # The SC: the overlay below a banner, pointing back at its source.
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES" and list(sc.PatientOrientation) == ["L", "F"]
    pixels = sc.pixel_array
    band = pixels.shape[0] - rgb.shape[0]
    assert pixels.shape[1:] == rgb.shape[1:] and band > 0
    np.testing.assert_array_equal(pixels[band:], rgb)
    assert (pixels[:band] == BANNER_TEXT).all(axis=2).sum() > 100  # the notice is drawn


def test_png_input_gets_a_new_study_with_an_empty_patient(
    predictor: Predictor, hannover: list[Path]
) -> None:
    prediction, rgb = predict(predictor, hannover[1], hannover[1].name)
    first = build_results(prediction.radiograph, prediction, rgb, predictor.info)
    second = build_results(prediction.radiograph, prediction, rgb, predictor.info)
    assert first.new_study and second.new_study
    sr = pydicom.dcmread(io.BytesIO(first.sr_bytes()))
    sc = pydicom.dcmread(io.BytesIO(first.sc_bytes()))
    assert sr.StudyInstanceUID == sc.StudyInstanceUID  # both in the one new study
    assert sr.StudyInstanceUID != second.sr.StudyInstanceUID  # a new study each time
    assert sc.PatientName == "" and sc.PatientID in ("", None)
    assert "SourceImageSequence" not in sc
    assert by_meaning(sr)["images"] == [sc.SOPInstanceUID]  # the SR reports on the SC


def test_dicom_without_its_uids_is_refused_by_name(
    predictor: Predictor, hannover: list[Path]
) -> None:
    data = dicom_of(hannover[0])
    prediction, rgb = predict(predictor, data, "no-study.dcm")
    del prediction.radiograph.dataset.StudyInstanceUID
    with pytest.raises(RadiographError, match=r"no-study\.dcm.*StudyInstanceUID"):
        build_results(prediction.radiograph, prediction, rgb, predictor.info)


@pytest.mark.slow
def test_predict_cli_writes_dicom_results(hannover: list[Path], tmp_path: Path) -> None:
    dicom = tmp_path / "in" / "hannover.dcm"
    dicom.parent.mkdir()
    dicom.write_bytes(dicom_of(hannover[0]))
    out = tmp_path / "results"
    command = [sys.executable, "-m", "covid_cxr.cli", "predict", str(dicom), str(hannover[1])]
    result = subprocess.run(
        [*command, "--dicom-out", str(out), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr
    source = pydicom.dcmread(dicom, stop_before_pixels=True)
    sr_path, sc_path = result_files(out, "hannover")
    sr, sc = hd.sr.srread(sr_path), pydicom.dcmread(sc_path)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == sc.PatientID == "SYN-0001"
    assert by_meaning(sr)["images"] == [source.SOPInstanceUID]
    png_sr, png_sc = result_files(out, hannover[1].stem)
    assert pydicom.dcmread(png_sr).StudyInstanceUID != source.StudyInstanceUID
    assert png_sc.is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [sr_path.name, sc_path.name, png_sr.name, png_sc.name]
    )


def test_api_returns_the_same_objects_with_dicom_true(hannover: list[Path]) -> None:
    from covid_cxr.paths import DEFAULT_MODEL
    from covid_cxr.service.engine import Engine
    from covid_cxr.service.settings import ServiceSettings
    from service_helpers import asgi_client, make_app

    app = make_app(Engine.load(ServiceSettings(model=str(DEFAULT_MODEL))))
    data = dicom_of(hannover[0])
    source = pydicom.dcmread(io.BytesIO(data))
    without_study = dicom_of(hannover[0], StudyInstanceUID="")
    with asgi_client(app) as client:
        answer = client.post("/api/v1/predict?dicom=true", files={"file": ("h.dcm", data)})
        png = client.post(
            "/api/v1/predict",
            files={"file": ("h.png", hannover[1].read_bytes())},
            data={"dicom": "true"},
        )
        plain = client.post("/api/v1/predict", files={"file": ("h.dcm", data)})
        batch = client.post(
            "/api/v1/predict/batch?dicom=true",
            files=[("files", ("a.dcm", data)), ("files", ("b.png", hannover[1].read_bytes()))],
        )
        refused = client.post("/api/v1/predict?dicom=1", files={"file": ("x.dcm", without_study)})
    assert (answer.status_code, png.status_code, plain.status_code) == (200, 200, 200), answer.text
    body = answer.json()
    results = body["dicom"]
    sr = pydicom.dcmread(io.BytesIO(base64.b64decode(results["sr_base64"])))
    sc = pydicom.dcmread(io.BytesIO(base64.b64decode(results["sc_base64"])))
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == source.StudyInstanceUID
    assert results["study_instance_uid"] == source.StudyInstanceUID and not results["new_study"]
    assert (results["sr_sop_instance_uid"], results["sc_sop_instance_uid"]) == (
        sr.SOPInstanceUID,
        sc.SOPInstanceUID,
    )
    assert sr.PatientID == sc.PatientID == "SYN-0001"
    values = by_meaning(sr)
    assert values["Probability of COVID-19"] == pytest.approx(body["probability"])
    assert values["images"] == [source.SOPInstanceUID]
    assert body["cam"] is None  # the heat map travels in the SC only, unless cam=true
    assert png.json()["dicom"]["new_study"] and plain.json()["dicom"] is None
    items = [item["result"]["dicom"] for item in batch.json()["results"]]
    assert [item["new_study"] for item in items] == [False, True]
    assert items[0]["study_instance_uid"] == source.StudyInstanceUID
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "missing_uid"
    assert "StudyInstanceUID" in refused.json()["error"]["message"]
