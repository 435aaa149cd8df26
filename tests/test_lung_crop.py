"""The lung-crop preprocessing option (`preprocess.lungs`): settings recorded in the model's
info, the crop box, attenuation, and every path that makes model inputs (Predictor, predict
--cam, training, export) on real radiographs with the shipped lung segmenter."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.cli import main
from covid_cxr.errors import RadiographError
from covid_cxr.evaluation.attention import cam_share_in_lungs
from covid_cxr.explain.gradcam import overlay
from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph
from covid_cxr.imaging.preprocess import crop_box, grey_to_uint8, input_box, scale_box
from covid_cxr.inference.export import load_inputs
from covid_cxr.inference.metadata import update_onnx_info
from covid_cxr.inference.predictor import Predictor
from covid_cxr.models.info import ModelInfo
from covid_cxr.paths import REPO_ROOT, shipped_model
from covid_cxr.segmentation import LungSegmenter
from covid_cxr.segmentation.inputs import NoLungsError, model_input
from covid_cxr.service.engine import Engine
from covid_cxr.service.settings import ServiceSettings
from inference_helpers import real_radiographs
from service_helpers import TEST_SETTINGS, asgi_client, make_app
from train_helpers import real_rows, write_rows

CROP = PreprocessConfig(size=224, intensity="equalize", lungs="crop", lung_margin=0.1)


@pytest.fixture(scope="module")
def segmenter() -> LungSegmenter:
    return LungSegmenter()


@pytest.fixture(scope="module")
def files(datasets: Path) -> list[Path]:
    """Real PNGs (Hannover COVID-19, NIH normal) and a Cohen COVID-19 JPEG."""
    real = real_radiographs(datasets)
    return [real["png"][0], real["png"][6], real["jpeg"][0]]


@pytest.fixture(scope="module")
def lung_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped classifier with an info that says its inputs are lung crops."""
    path = tmp_path_factory.mktemp("lung-model") / "lung-crop.onnx"
    shutil.copy(shipped_model("covid-cxr-default.onnx"), path)
    update_onnx_info(path, preprocess=CROP.to_dict())
    return path


@pytest.fixture(scope="module")
def whole_image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped classifier with an info that says its inputs are whole radiographs."""
    path = tmp_path_factory.mktemp("whole-model") / "whole-image.onnx"
    shutil.copy(shipped_model("covid-cxr-default.onnx"), path)
    update_onnx_info(path, preprocess=PreprocessConfig(intensity="equalize", crop=0.9).to_dict())
    return path


def test_settings_round_trip_through_model_info_and_old_info_loads_as_off() -> None:
    info = ModelInfo(name="x", preprocess=CROP)
    data = json.loads(json.dumps(info.to_dict()))
    assert data["preprocess"]["lungs"] == "crop"
    assert ModelInfo.from_dict(data).preprocess == CROP
    old = {"size": 224, "intensity": "equalize", "crop": 0.9}  # a model from before the option
    loaded = ModelInfo.from_dict({**data, "preprocess": old}).preprocess
    assert loaded.lungs == "off" and not loaded.needs_lungs
    assert loaded.to_dict() == old  # and it records exactly what it did before


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"lungs": "mask"}, "preprocess.lungs"),
        ({"lungs": "crop", "lung_margin": -0.1}, "preprocess.lung_margin"),
        ({"lungs": "crop", "lung_margin": 0.8}, "preprocess.lung_margin"),
        ({"lungs": "crop-attenuate", "outside_lungs": 1.5}, "preprocess.outside_lungs"),
    ],
)
def test_invalid_lung_settings_are_refused(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PreprocessConfig(**options)


def test_crop_box_is_the_lungs_box_plus_margin_clipped_to_the_image(
    files: list[Path], segmenter: LungSegmenter
) -> None:
    for path in files:
        pixels = read_radiograph(path).pixels
        lungs = segmenter.segment(pixels)
        assert lungs.bbox is not None, path
        top, left, bottom, right = lungs.bbox
        pad_h, pad_w = round((bottom - top) * 0.1), round((right - left) * 0.1)
        expected = (
            max(0, top - pad_h),
            max(0, left - pad_w),
            min(pixels.shape[0], bottom + pad_h) - max(0, top - pad_h),
            min(pixels.shape[1], right + pad_w) - max(0, left - pad_w),
        )
        box = input_box(pixels.shape, CROP, lungs.mask)
        assert box == expected
        assert box != crop_box(*pixels.shape, CROP.crop)  # not the central box
        # A margin as wide as half the box reaches past the image: clipped to its edges.
        wide = input_box(pixels.shape, PreprocessConfig(lungs="crop", lung_margin=0.5), lungs.mask)
        assert wide[0] >= 0 and wide[1] >= 0
        assert wide[0] + wide[2] <= pixels.shape[0] and wide[1] + wide[3] <= pixels.shape[1]
        assert wide[0] <= box[0] and wide[0] + wide[2] >= box[0] + box[2]
        assert 0 in wide[:2] or wide[0] + wide[2] == pixels.shape[0]


def test_attenuation_changes_only_what_lies_outside_the_lungs(
    files: list[Path], segmenter: LungSegmenter
) -> None:
    pixels = read_radiograph(files[0]).pixels
    mask = segmenter.segment(pixels).mask
    crop = PreprocessConfig(size=128, lungs="crop")  # "rescale": intensities stay linear
    dimmed = PreprocessConfig(size=128, lungs="crop-attenuate", outside_lungs=0.3)
    plain, attenuated = preprocess(pixels, crop, mask), preprocess(pixels, dimmed, mask)
    top, left, height, width = input_box(pixels.shape, crop, mask)
    window = mask[top : top + height, left : left + width].astype(np.float32)
    share = np.asarray(Image.fromarray(window).resize((128, 128), Image.Resampling.BILINEAR))
    inside, outside = share >= 1.0 - 1e-6, share <= 1e-6
    assert inside.sum() > 1000 and outside.sum() > 100
    np.testing.assert_allclose(attenuated[inside], plain[inside], atol=1e-5)
    np.testing.assert_allclose(attenuated[outside], 0.3 * plain[outside], atol=1e-5)
    assert (attenuated[outside] < plain[outside] - 1e-3).mean() > 0.5


def test_a_lung_config_needs_the_mask_and_an_image_without_lungs_is_refused(
    segmenter: LungSegmenter,
) -> None:
    pixels = np.zeros((512, 512), np.float32)  # a blank frame: no lungs to find
    with pytest.raises(ValueError, match="lung mask is needed"):
        preprocess(pixels, CROP)
    with pytest.raises(NoLungsError, match=r"blank\.png: no lung fields found") as caught:
        model_input(pixels, CROP, segmenter, source="blank.png")
    assert isinstance(caught.value, RadiographError)
    plain = PreprocessConfig(crop=0.9)  # no lung crop: no segmenter needed, central box
    made = model_input(pixels, plain)
    assert made.box == crop_box(512, 512, 0.9) and made.pixels.shape == (224, 224)


def test_predictor_crops_to_the_lungs_and_places_the_map_on_that_box(
    lung_model: Path,
    whole_image_model: Path,
    files: list[Path],
    segmenter: LungSegmenter,
    tmp_path: Path,
) -> None:
    predictor = Predictor(lung_model)
    assert predictor.lungs is not None
    assert Predictor(whole_image_model).lungs is None  # the segmenter is loaded only if needed
    results = predictor.predict_batch(files, cam=True)
    for path, result in zip(files, results, strict=True):
        pixels = result.radiograph.pixels
        expected = model_input(pixels, CROP, segmenter)
        assert result.box == expected.box, path
        assert result.cam is not None and 0.0 <= result.probability <= 1.0
        _assert_map_inside(overlay(pixels, result.cam, box=result.box), pixels, result.box)
    blank = tmp_path / "blank.png"
    Image.new("L", (400, 400)).save(blank)
    with pytest.raises(NoLungsError, match=r"blank\.png: no lung fields found"):
        Predictor(lung_model, gate=False).predict(blank)  # research bypass of the gate


def test_predict_cli_writes_cam_overlays_on_the_lung_box(
    lung_model: Path, files: list[Path], segmenter: LungSegmenter, tmp_path: Path, capsys
) -> None:
    cams = tmp_path / "cams"
    options = ["--model", str(lung_model), "--cam", str(cams), "--format", "jsonl"]
    code = main(["predict", *map(str, files), *options])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(records) == len(files)
    for record in records:
        pixels = read_radiograph(record["path"]).pixels
        box = input_box(pixels.shape, CROP, segmenter.segment(pixels).mask)
        _assert_map_inside(np.asarray(Image.open(record["cam"])), pixels, box)


def _assert_map_inside(rgb: np.ndarray, pixels: np.ndarray, box: tuple[int, ...]) -> None:
    """Outside `box` the overlay is the plain grey radiograph; inside it the map shows."""
    top, left, height, width = box
    grey = np.repeat(grey_to_uint8(pixels)[:, :, None], 3, axis=2)
    inside = np.zeros(pixels.shape, bool)
    inside[top : top + height, left : left + width] = True
    assert rgb.shape == grey.shape
    assert np.array_equal(rgb[~inside], grey[~inside])
    assert (rgb[inside] != grey[inside]).any(axis=1).mean() > 0.5


def test_service_cam_is_placed_on_the_scaled_lung_box(
    lung_model: Path, files: list[Path], segmenter: LungSegmenter
) -> None:
    settings = {**TEST_SETTINGS, "image_max_side": 200}  # the map goes on a scaled-down copy
    engine = Engine.load(ServiceSettings(**settings, model=str(lung_model)))
    app = make_app(engine, image_max_side=200)
    path = files[2]
    try:
        with asgi_client(app) as client:
            upload = {"file": (path.name, path.read_bytes(), "image/jpeg")}
            response = client.post("/api/v1/predict", params={"cam": "true"}, files=upload)
    finally:
        app.state.service.pool.shutdown()
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["cam"]["png_base64"])
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    pixels = read_radiograph(path).pixels
    box = input_box(pixels.shape, CROP, segmenter.segment(pixels).mask)
    top, left, height, width = scale_box(box, pixels.shape, rgb.shape[:2])
    assert max(rgb.shape[:2]) == 200
    coloured = np.abs(rgb[..., 0] - rgb[..., 2]) > 0
    inside = np.zeros(coloured.shape, bool)
    inside[top : top + height, left : left + width] = True
    assert not coloured[~inside].any()  # grey outside the box the model saw
    assert coloured[inside].mean() > 0.5


def test_cam_share_in_lungs_uses_the_box(files: list[Path], segmenter: LungSegmenter) -> None:
    pixels = read_radiograph(files[1]).pixels
    mask = segmenter.segment(pixels).mask
    top, left, height, width = box = input_box(pixels.shape, CROP, mask)
    flat = np.ones((7, 7), np.float32)  # evenly spread evidence over what the model saw
    share = cam_share_in_lungs(flat, mask, box=box)
    assert share == pytest.approx(mask[top : top + height, left : left + width].mean(), abs=1e-6)
    assert share > cam_share_in_lungs(flat, mask)  # the whole radiograph has more non-lung


def test_scaled_box_stays_on_the_scaled_radiograph() -> None:
    assert scale_box((100, 50, 800, 400), (1000, 500), (500, 250)) == (50, 25, 400, 200)
    top, left, height, width = scale_box((0, 0, 999, 499), (999, 499), (640, 320))
    assert (top, left, top + height, left + width) == (0, 0, 640, 320)


def test_export_inputs_are_lung_crops(files: list[Path], segmenter: LungSegmenter) -> None:
    loaded = load_inputs(files, CROP, workers=0)
    assert loaded.inputs.shape == (len(files), 1, 224, 224)
    for path, array in zip(files, loaded.inputs, strict=True):
        expected = model_input(read_radiograph(path).pixels, CROP, segmenter).pixels
        np.testing.assert_array_equal(array[0], expected)


@pytest.mark.slow
def test_training_with_a_lung_crop_records_it_in_the_checkpoint(
    datasets: Path, tmp_path: Path
) -> None:
    from covid_cxr.models.checkpoint import read_checkpoint

    manifest = write_rows(tmp_path / "manifest.csv", real_rows(datasets, 8, 8), datasets)
    template = (REPO_ROOT / "configs" / "train" / "ci.toml").read_text(encoding="utf-8")
    config = tmp_path / "lung-ci.toml"
    config.write_text(
        template.replace("[preprocess]\nsize = 64\n", '[preprocess]\nsize = 64\nlungs = "crop"\n'),
        encoding="utf-8",
    )
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--manifest", str(manifest), "--out", str(out)]
    assert main([*args, "--epochs", "1", "--no-progress"]) == 0
    info = ModelInfo.from_dict(read_checkpoint(out / "best.pt")["info"])
    assert info.preprocess.lungs == "crop" and info.preprocess.size == 64
