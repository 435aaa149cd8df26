"""The one preprocessing function: shapes, grey levels, exposure invariance, the centre crop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph

# Real radiographs of three hospitals and formats (8-bit JPEG children, PNG adults).
REAL = [
    "kaggle-normal-196/NORMAL/NORMAL2-IM-1018-0001.jpeg",
    "covid-19-image-repository/png/262a70ca.png",
    "nih-chestxray8-subset/Pneumonia/00001250_001.png",
]
EQUALIZE = PreprocessConfig(intensity="equalize")


def smooth_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A synthetic 'radiograph': smooth blobs on a gradient, mostly dark, above a film-base grey."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    image = 0.3 * x + 0.1 * y
    for _ in range(12):
        cy, cx, r = rng.random(3)
        image += 0.4 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.02 + 0.05 * r))
    image = (image - image.min()) / (image.max() - image.min())
    return (0.05 + 0.9 * image**2).astype(np.float32)


def flatness(image: np.ndarray, bins: int = 10) -> float:
    """Largest deviation of a bin's share from 1 / bins (0 for a perfectly flat histogram)."""
    shares = np.histogram(image, bins=bins, range=(0.0, 1.0))[0] / image.size
    return float(np.abs(shares - 1 / bins).max())


@pytest.mark.parametrize("intensity", ["rescale", "equalize"])
@pytest.mark.parametrize("crop", [1.0, 0.8])
def test_output_is_square_float32_in_unit_range(intensity: str, crop: float) -> None:
    pixels = np.random.default_rng(1).random((150, 97))  # float64, not square
    out = preprocess(pixels, PreprocessConfig(size=48, intensity=intensity, crop=crop))
    assert out.shape == (48, 48)
    assert out.dtype == np.float32
    assert 0.0 <= out.min() < out.max() <= 1.0


def test_input_is_not_modified() -> None:
    pixels = smooth_image((80, 64))
    before = pixels.copy()
    preprocess(pixels, PreprocessConfig(size=32, intensity="equalize", crop=0.6))
    np.testing.assert_array_equal(pixels, before)


@pytest.mark.parametrize("shape", [(3, 64, 64), (64,)])
def test_non_2d_input_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros(shape, np.float32), PreprocessConfig(size=32))


def test_rescale_keeps_a_uniform_grey_level() -> None:
    out = preprocess(np.full((300, 200), 0.37, np.float32), PreprocessConfig(size=64))
    np.testing.assert_allclose(out, 0.37, atol=1e-6)


def test_rescale_at_the_stored_size_is_the_identity() -> None:
    pixels = smooth_image((64, 64))
    np.testing.assert_array_equal(preprocess(pixels, PreprocessConfig(size=64)), pixels)


def test_equalize_of_a_uniform_image_is_finite_and_flat() -> None:
    out = preprocess(
        np.full((64, 64), 0.6, np.float32), PreprocessConfig(size=32, intensity="equalize")
    )
    assert np.isfinite(out).all() and out.std() == 0


def test_equalize_flattens_a_skewed_histogram() -> None:
    pixels = smooth_image((224, 224))
    assert flatness(pixels) > 0.1  # mostly dark: far from flat before
    assert flatness(preprocess(pixels, EQUALIZE)) < 0.01


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_equalize_undoes_an_exposure_change_of_a_synthetic_image(gamma: float) -> None:
    pixels = smooth_image((224, 224))
    changed = pixels**gamma
    rescaled = np.abs(
        preprocess(pixels, PreprocessConfig()) - preprocess(changed, PreprocessConfig())
    )
    equalized = np.abs(preprocess(pixels, EQUALIZE) - preprocess(changed, EQUALIZE))
    assert rescaled.mean() > 0.1
    assert equalized.mean() < 0.01, equalized.mean()


@pytest.mark.parametrize("relative", REAL)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_equalize_undoes_an_exposure_change_of_a_real_radiograph(
    datasets: Path, relative: str, gamma: float
) -> None:
    pixels = read_radiograph(datasets / relative).pixels
    changed = pixels**gamma
    rescaled = np.abs(
        preprocess(pixels, PreprocessConfig()) - preprocess(changed, PreprocessConfig())
    )
    equalized = np.abs(preprocess(pixels, EQUALIZE) - preprocess(changed, EQUALIZE))
    assert rescaled.mean() > 0.1
    assert equalized.mean() < 0.01, f"{relative} gamma {gamma}: mean change {equalized.mean():.4f}"
    assert np.percentile(equalized, 99) < 0.05
    assert flatness(preprocess(pixels, EQUALIZE)) < 0.01


def marked_image(shape: tuple[int, int]) -> np.ndarray:
    """Black, a bright square in the middle (the lungs), a bright marker in the top-left corner."""
    h, w = shape
    image = np.zeros(shape, np.float32)
    image[h // 2 - h // 10 : h // 2 + h // 10, w // 2 - w // 10 : w // 2 + w // 10] = 1.0
    image[h // 40 : h // 8, w // 40 : w // 8] = 1.0
    return image


@pytest.mark.parametrize("shape", [(200, 200), (300, 180)])
def test_crop_keeps_the_centre_and_drops_a_border_marker(shape: tuple[int, int]) -> None:
    pixels = marked_image(shape)
    full = preprocess(pixels, PreprocessConfig(size=64, crop=1.0))
    cropped = preprocess(pixels, PreprocessConfig(size=64, crop=0.5))
    assert full[:8, :8].max() > 0.99  # the marker is there without the crop
    assert cropped[:16, :16].max() == 0.0  # and gone with it
    # Half of each side kept: the central square (20% of the side) doubles and stays centred.
    assert cropped[24:40, 24:40].min() > 0.99
    assert (full > 0.5).mean() == pytest.approx(0.04 + 0.01, abs=0.01)
    assert (cropped > 0.5).mean() == pytest.approx(0.16, abs=0.02)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"size": 15}, "preprocess.size"),
        ({"size": 2049}, "preprocess.size"),
        ({"intensity": "clahe"}, "preprocess.intensity"),
        ({"crop": 0.49}, "preprocess.crop"),
        ({"crop": 1.01}, "preprocess.crop"),
    ],
)
def test_invalid_settings_are_refused(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PreprocessConfig(**options)


def test_limits_themselves_are_valid() -> None:
    PreprocessConfig(size=16, crop=0.5)
    PreprocessConfig(size=2048, crop=1.0, intensity="equalize")


def test_settings_round_trip_through_a_plain_dict() -> None:
    config = PreprocessConfig(size=256, intensity="equalize", crop=0.85)
    data = json.loads(json.dumps(config.to_dict()))  # as stored in ONNX metadata
    assert data == {"size": 256, "intensity": "equalize", "crop": 0.85}
    assert PreprocessConfig.from_dict(data) == config
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


def test_real_radiograph_preprocessing_is_deterministic(datasets: Path) -> None:
    path = datasets / REAL[1]
    config = PreprocessConfig(size=224, intensity="equalize", crop=0.9)
    first = preprocess(read_radiograph(path).pixels, config)
    again = preprocess(read_radiograph(path.read_bytes(), name=path.name).pixels, config)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (224, 224) and first.dtype == np.float32
    assert first.std() > 0.2  # an equalised radiograph spans the grey range
