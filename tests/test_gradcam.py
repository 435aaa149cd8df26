"""Grad-CAM: shapes and hygiene on every factory model, CAM equivalence, overlay geometry, and
that the map follows the evidence on a model trained to find a bright patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from covid_cxr import models
from covid_cxr.explain.gradcam import JET, cam_from_features, grad_cam, overlay
from covid_cxr.imaging import PreprocessConfig, preprocess
from covid_cxr.imaging.preprocess import crop_box

torch.set_num_threads(2)

# Smallest input each architecture reduces to a useful map (seed-cnn fixes its size).
OPTIONS = {"seed-cnn": {"size": 64}, "efficientnet-lite0": {}}
SIDES = {
    "seed-cnn": 64,
    "efficientnet-lite0": 96,
    "efficientnet-lite1": 96,
    "efficientnet-lite2": 96,
}


@pytest.mark.parametrize("name", models.available("classification"))
def test_grad_cam_on_every_factory_model(name: str) -> None:
    torch.manual_seed(0)
    model = models.create(name, pretrained=False, **OPTIONS.get(name, {}))
    model.train()
    side = SIDES.get(name, 128)
    batch = torch.rand(2, 1, side, side)
    hooks_before = len(model.cam_layer._forward_hooks)

    logits, maps = grad_cam(model, batch)

    assert logits.shape == (2,)
    assert maps.ndim == 3 and maps.shape[0] == 2 and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert all(m.max() == pytest.approx(1.0) and m.std() > 0 for m in maps), "map is constant"
    assert model.training, "grad_cam must leave the model in the mode it found"
    assert len(model.cam_layer._forward_hooks) == hooks_before, "hook leaked"
    assert all(p.grad is None for p in model.parameters()), "parameter gradients were touched"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(batch))


def test_grad_cam_equals_cam_from_exported_features_on_efficientnet() -> None:
    torch.manual_seed(1)
    model = models.create("efficientnet-lite0", pretrained=False).eval()
    batch = torch.rand(2, 1, 128, 128)
    _, maps = grad_cam(model, batch)
    with torch.no_grad():
        features = model.features(batch).numpy()
    cams = cam_from_features(features, model._fc.weight.detach().numpy()[0])
    assert cams.shape == maps.shape == (2, 4, 4)
    np.testing.assert_allclose(cams, maps, atol=1e-4)


def test_flat_or_negative_evidence_gives_a_zero_map_not_nan() -> None:
    features = np.stack([np.full((2, 3, 3), 0.7), -np.ones((2, 3, 3))]).astype(np.float32)
    cams = cam_from_features(features, np.array([1.0, 0.5]))
    assert np.isfinite(cams).all()
    assert (cams == 0).all()


def test_cam_from_features_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        cam_from_features(np.zeros((1, 4, 2, 2)), np.zeros(3))


def test_crop_box_is_the_region_preprocess_keeps() -> None:
    # A horizontal and a vertical ramp: after cropping, their extremes reveal the box.
    h, w, crop = 101, 77, 0.8
    top, left, ch, cw = crop_box(h, w, crop)
    rows = np.repeat(np.arange(h, dtype=np.float32)[:, None], w, axis=1) / (h - 1)
    cols = np.repeat(np.arange(w, dtype=np.float32)[None, :], h, axis=0) / (w - 1)
    config = PreprocessConfig(size=max(ch, cw), crop=crop)
    kept_rows, kept_cols = preprocess(rows, config), preprocess(cols, config)
    assert kept_rows.min() == pytest.approx(top / (h - 1), abs=0.02)
    assert kept_rows.max() == pytest.approx((top + ch - 1) / (h - 1), abs=0.02)
    assert kept_cols.min() == pytest.approx(left / (w - 1), abs=0.02)
    assert kept_cols.max() == pytest.approx((left + cw - 1) / (w - 1), abs=0.02)


def test_overlay_is_at_original_resolution_and_places_the_map_inside_the_crop() -> None:
    pixels = np.full((300, 200), 0.5, dtype=np.float32)
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 0] = 1.0  # evidence in the top-left of what the model saw

    image = overlay(pixels, cam, alpha=0.5, crop=0.5)

    assert image.shape == (300, 200, 3) and image.dtype == np.uint8
    top, left, ch, cw = crop_box(300, 200, 0.5)
    grey = round(0.5 * 255)
    # Outside the crop the radiograph is untouched grey.
    assert (image[:top] == grey).all() and (image[:, :left] == grey).all()

    # The crop's top-left corner carries the hottest colour, its opposite corner the coldest.
    def blended(colour: np.ndarray) -> np.ndarray:
        return np.round(0.5 * grey + 0.5 * colour.astype(float))

    np.testing.assert_allclose(image[top, left], blended(JET[255]), atol=1)
    np.testing.assert_allclose(image[top + ch - 1, left + cw - 1], blended(JET[0]), atol=1)
    assert (image[top - 1, left] == grey).all() and (image[top, left - 1] == grey).all()


def _patch_images(
    rng: np.random.Generator, side: int, patch: int, corners: list[tuple[int, int] | None]
) -> np.ndarray:
    """Noise images with a bright square at each corner given (None: no patch)."""
    images = rng.uniform(0.0, 0.4, size=(len(corners), 1, side, side)).astype(np.float32)
    for image, corner in zip(images, corners, strict=True):
        if corner is not None:
            r, c = corner
            image[0, r : r + patch, c : c + patch] = 1.0
    return images


class PatchNet(nn.Module):
    """A tiny convolutional net with the factory's contract (N,1,H,W) -> (N,) and cam_layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.cam_layer = self.features[-1]
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3))).squeeze(1)


@pytest.fixture
def one_thread():
    """Tiny convolutions run fastest on one thread, and far slower on a busy machine with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_grad_cam_follows_a_moving_patch_after_training() -> None:
    """A net trained on 'bright patch = COVID' must put its map's peak where the patch is."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    side, patch, n = 32, 6, 512
    positive = rng.random(n) < 0.5
    corners = [tuple(rng.integers(0, side - patch, size=2)) if pos else None for pos in positive]
    inputs = torch.from_numpy(_patch_images(rng, side, patch, corners))
    targets = torch.tensor(positive, dtype=torch.float32)
    model = PatchNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(5):
        for batch in torch.randperm(n).split(16):
            optimiser.zero_grad()
            loss_fn(model(inputs[batch]), targets[batch]).backward()
            optimiser.step()

    places = [(1, 1), (1, 25), (25, 1), (25, 25), (13, 13)]
    probe = _patch_images(np.random.default_rng(1), side, patch, [*places, None])
    logits, maps = grad_cam(model, torch.from_numpy(probe))

    probabilities = torch.sigmoid(logits)
    assert (probabilities[:-1] > 0.9).all() and probabilities[-1] < 0.1, "patch not learned"
    h = maps.shape[1]
    peaks = []
    for (r, c), cam in zip(places, maps, strict=False):
        assert cam.std() > 0.05, "map is (nearly) constant"
        peak = np.array(np.unravel_index(np.argmax(cam), cam.shape)) + 0.5
        centre = (np.array([r, c]) + patch / 2) * h / side
        assert np.linalg.norm(peak - centre) <= 0.15 * h, f"peak {peak} far from patch {centre}"
        peaks.append(tuple(peak))
    assert len(set(peaks)) == len(places), "the peak did not move with the patch"
