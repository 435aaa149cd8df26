"""Dice, post-processing and mask geometry on hand-made arrays (no model, no data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covid_cxr.imaging.preprocess import PreprocessConfig
from covid_cxr.segmentation.masks import (
    bounding_box,
    dice,
    logits_to_image,
    lung_mask,
    mask_to_input,
    overlay,
    postprocess,
)
from covid_cxr.training.segmentation import dice_summary, hard_dice, segmentation_loss


def _box(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


def test_dice_on_known_overlaps() -> None:
    a = _box((10, 10), 0, 0, 10, 4)  # 40 pixels
    b = _box((10, 10), 0, 2, 10, 6)  # 40 pixels, 20 shared
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(2 * 20 / 80)
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, a[:5])


def test_postprocess_keeps_two_largest_components_and_fills_holes() -> None:
    mask = _box((40, 40), 5, 3, 35, 15) | _box((40, 40), 5, 22, 30, 37)  # two "lungs"
    mask[15:20, 6:10] = False  # a hole in the right lung
    mask[37:39, 37:39] = True  # a speck
    lungs = postprocess(mask)
    assert lungs.components == 2
    assert not lungs.mask[38, 38]  # speck gone
    assert lungs.mask[17, 8]  # hole filled
    expected = _box((40, 40), 5, 3, 35, 15) | _box((40, 40), 5, 22, 30, 37)
    assert np.array_equal(lungs.mask, expected)
    assert lungs.area_fraction == pytest.approx(expected.mean())
    assert lungs.bbox == (5, 3, 35, 37)
    png = lungs.to_png_array()
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 255}


def test_postprocess_of_nothing() -> None:
    lungs = postprocess(np.zeros((8, 8), bool))
    assert lungs.components == 0 and lungs.bbox is None and lungs.area_fraction == 0.0
    assert bounding_box(np.zeros((3, 3), bool)) is None


def test_mask_geometry_round_trip_with_a_crop() -> None:
    """A mask taken to model geometry and back lands where it was, outside the crop nothing."""
    config = PreprocessConfig(size=64, crop=0.8)
    truth = _box((200, 160), 40, 30, 160, 130)
    soft = mask_to_input(truth, config)
    assert soft.shape == (64, 64) and soft.min() >= 0.0 and soft.max() <= 1.0
    back = logits_to_image(np.where(soft > 0.5, 5.0, -5.0), truth.shape, config)
    assert back.shape == truth.shape
    assert dice(back, truth) > 0.97
    border = _box((200, 160), 0, 0, 200, 160) & ~_box((200, 160), 20, 16, 180, 144)
    assert not back[border].any()


def test_overlay_is_rgb_at_the_radiograph_size() -> None:
    pixels = np.linspace(0, 1, 50 * 60, dtype=np.float32).reshape(50, 60)
    picture = overlay(pixels, _box((50, 60), 10, 10, 40, 50))
    assert picture.shape == (50, 60, 3) and picture.dtype == np.uint8
    assert tuple(picture[10, 20]) == (255, 220, 0)  # outline
    assert picture[0, 0, 0] == picture[0, 0, 1]  # grey outside the lungs


def test_training_loss_and_dice_reward_the_right_mask() -> None:
    target = torch.from_numpy(_box((16, 16), 4, 4, 12, 12)).float()[None, None].repeat(2, 1, 1, 1)
    right = torch.where(target > 0.5, 8.0, -8.0)
    wrong = -right
    assert hard_dice(right, target).tolist() == [1.0, 1.0]
    assert hard_dice(wrong, target).tolist() == [0.0, 0.0]
    assert segmentation_loss(right, target) < 0.01 < 1.0 < segmentation_loss(wrong, target)


def test_dice_summary_balances_sources() -> None:
    summary = dice_summary(np.array([1.0, 1.0, 1.0, 0.4]), ["jsrt", "jsrt", "jsrt", "ieee8023"])
    assert summary["dice"] == pytest.approx(0.85)
    assert summary["dice_balanced"] == pytest.approx(0.7)
    assert summary["dice_jsrt"] == 1.0 and summary["dice_ieee8023"] == pytest.approx(0.4)
    assert np.isnan(summary["dice_openist"])


def test_lung_mask_cleans_at_model_size_and_returns_the_radiograph_size() -> None:
    config = PreprocessConfig(size=40)
    mask = _box((40, 40), 5, 3, 35, 15) | _box((40, 40), 5, 22, 30, 37)
    mask[15:20, 6:10] = False  # hole
    mask[37:39, 37:39] = True  # speck
    logits = np.where(mask, 4.0, -4.0)
    lungs = lung_mask(logits, (400, 320), config)
    assert lungs.mask.shape == (400, 320) and lungs.components == 2
    expected = _box((40, 40), 5, 3, 35, 15) | _box((40, 40), 5, 22, 30, 37)
    truth = np.kron(expected, np.ones((10, 8), bool))
    assert dice(lungs.mask, truth) > 0.98
    assert not lungs.mask[375:390, 300:312].any()  # speck gone
    assert lungs.mask[150:200, 48:80].all()  # hole filled
    assert lungs.area_fraction == pytest.approx(lungs.mask.mean())
