"""Augmentations that imitate what hospitals' images differ in (blur, noise, burnt-in marks,
borders): each is off by default, per image, reproducible from its seed, and never touches masks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from covid_cxr.config import AugmentConfig, TrainConfig, load_config
from covid_cxr.errors import ConfigError
from covid_cxr.training.augment import augment_batch, describe

SOURCE_OPS = {
    "blur": AugmentConfig(blur=1.0),
    "noise": AugmentConfig(noise=0.1),
    "overlays": AugmentConfig(overlays=1.0),
    "borders": AugmentConfig(borders=1.0, border_max=0.2),
}
ALL_ON = AugmentConfig(
    rotation=7, zoom=0.1, translate=0.05, crop_scale=0.8, brightness=0.08, contrast=0.15,
    gamma=0.25, blur=0.5, noise=0.03, overlays=0.5, borders=0.5,
)  # fmt: skip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Random texture in [0.25, 0.75]: no pixel is 0 or 1, every pixel has fine detail."""
    return 0.25 + 0.5 * torch.rand(n, 1, size, size, generator=_gen(seed))


def _changed(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which images differ at all from the input."""
    return (out != x).flatten(1).any(1)


def test_off_by_default_and_strengths_alone_change_nothing() -> None:
    x = _images(8)
    strengths_only = AugmentConfig(blur_sigma=4.0, border_max=0.4)
    for config in (AugmentConfig(), strengths_only):
        assert torch.equal(augment_batch(x, config, _gen(0)), x)
    assert describe(strengths_only) == "none"


@pytest.mark.parametrize("name", sorted(SOURCE_OPS))
def test_each_change_alters_images_within_range_and_shape(name: str) -> None:
    x = _images(32)
    out = augment_batch(x, SOURCE_OPS[name], _gen(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Most images change: a blur of sigma under ~0.17 px or a band under a pixel does not.
    assert int(_changed(out, x).sum()) >= 20
    assert name in describe(SOURCE_OPS[name])


@pytest.mark.parametrize("name", ["blur", "overlays", "borders"])
def test_the_probability_picks_images_and_leaves_the_others_bit_identical(name: str) -> None:
    x = _images(64)
    half = dataclasses.replace(SOURCE_OPS[name], **{name: 0.5})
    changed = _changed(augment_batch(x, half, _gen(2)), x)
    assert 14 <= int(changed.sum()) <= 48
    # Unchanged images are exact copies: nothing was applied to them at all.
    out = augment_batch(x, half, _gen(2))
    assert torch.equal(out[~changed], x[~changed])


def test_the_same_seed_gives_the_same_batch_and_another_seed_another() -> None:
    x = _images(8)
    a, b = augment_batch(x, ALL_ON, _gen(5)), augment_batch(x, ALL_ON, _gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, ALL_ON, _gen(6)))


def test_masks_get_the_geometry_only_never_the_source_changes() -> None:
    x = _images(16)
    masks = (x > 0.5).float()
    geometry = dataclasses.replace(ALL_ON, blur=0.0, noise=0.0, overlays=0.0, borders=0.0)
    strong = dataclasses.replace(ALL_ON, blur=1.0, noise=0.2, overlays=1.0, borders=1.0)
    _, plain = augment_batch(x, geometry, _gen(3), masks)
    images, out = augment_batch(x, strong, _gen(3), masks)
    assert torch.equal(out, plain)
    assert torch.equal(images, augment_batch(x, strong, _gen(3)))  # masks draw nothing


def test_blur_removes_fine_detail_and_its_sigma_stays_within_blur_sigma() -> None:
    x = _images(32)
    out = augment_batch(x, AugmentConfig(blur=1.0, blur_sigma=1.5), _gen(4))

    def detail(t: torch.Tensor) -> torch.Tensor:
        return (t.diff(dim=-1) ** 2).mean((1, 2, 3)) + (t.diff(dim=-2) ** 2).mean((1, 2, 3))

    ratio = detail(out) / detail(x)
    assert float(ratio.max()) <= 1.0 and float(ratio.median()) < 0.3
    # A point spreads into a Gaussian of the image's sigma: variance <= 1.5 ** 2, mass kept.
    point = torch.zeros(200, 1, 41, 41)
    point[..., 20, 20] = 1.0
    spread = augment_batch(point, AugmentConfig(blur=1.0, blur_sigma=1.5), _gen(5))
    offsets = (torch.arange(41) - 20.0) ** 2
    variance = (spread.sum(-2) * offsets).sum((1, 2))
    torch.testing.assert_close(spread.sum((1, 2, 3)), torch.ones(200))
    assert float(variance.max()) <= 1.5**2 * 1.01 and float(variance.max()) > 1.5**2 * 0.9
    assert float(variance.min()) < 0.1


def test_noise_std_is_drawn_per_image_up_to_noise() -> None:
    x = torch.full((64, 1, 64, 64), 0.5)
    out = augment_batch(x, AugmentConfig(noise=0.1), _gen(6))
    std = (out - x).std((1, 2, 3))
    assert float(std.max()) <= 0.1 * 1.05
    assert float(std.max()) > 0.09 and float(std.min()) < 0.01


def _edge_bands(changed: torch.Tensor) -> torch.Tensor:
    """The union of full-width/-height edge bands as deep as the fully changed edge lines."""
    h, w = changed.shape
    rows, cols = changed.all(1), changed.all(0)
    top, bottom = int(rows.cummin(0).values.sum()), int(rows.flip(0).cummin(0).values.sum())
    left, right = int(cols.cummin(0).values.sum()), int(cols.flip(0).cummin(0).values.sum())
    r, c = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
    return (r < top) | (r >= h - bottom) | (c < left) | (c >= w - right)


def test_borders_are_constant_black_or_white_bands_on_the_edges() -> None:
    x = _images(64, size=40)
    out = augment_batch(x, AugmentConfig(borders=1.0, border_max=0.25), _gen(7))
    colours = set()
    for image, original in zip(out[:, 0], x[:, 0], strict=True):
        changed = image != original
        if not changed.any():
            continue
        values = image[changed].unique().tolist()
        assert len(values) == 1 and values[0] in (0.0, 1.0)  # one colour per image
        colours.add(values[0])
        assert torch.equal(changed, _edge_bands(changed))  # bands on the sides, nothing else
        assert not changed[10:-10, 10:-10].any()  # at most 25% of 40 px deep
    assert colours == {0.0, 1.0}


def test_overlays_are_small_flat_marks_mostly_near_the_corners() -> None:
    x = _images(64, size=100)
    out = augment_batch(x, AugmentConfig(overlays=1.0), _gen(8))
    changed = out != x
    fraction = changed.float().mean((1, 2, 3))
    assert float(fraction.min()) > 0 and float(fraction.max()) <= 3 * 0.08**2
    values = out[changed]
    assert bool(((values <= 0.15) | (values >= 0.85)).all())  # bright or dark, never mid-grey
    edge = (torch.arange(100) < 23) | (torch.arange(100) >= 77)
    corners = edge.view(100, 1) & edge.view(1, 100)  # 21% of the image
    assert float(changed[..., corners].float().sum() / changed.float().sum()) > 0.5


def test_new_fields_load_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(
        'name = "t"\nmanifest = "m.csv"\n[augment]\n'
        "blur = 0.3\nblur_sigma = 2\nnoise = 0.02\noverlays = 0.5\nborders = 0.25\n"
        "border_max = 0.1\n",
        encoding="utf-8",
    )
    augment = load_config(path, TrainConfig).augment
    assert augment == AugmentConfig(
        blur=0.3, blur_sigma=2.0, noise=0.02, overlays=0.5, borders=0.25, border_max=0.1
    )


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("blur = 1.5", "blur is a probability"),
        ("overlays = -0.1", "overlays is a probability"),
        ("borders = true", "expected float"),
        ("noise = 2.0", "noise"),
        ('noise = "a lot"', "expected float"),
        ("blur_sigma = 0", "blur_sigma must be > 0"),
        ("border_max = 0.6", "border_max"),
    ],
)
def test_wrong_values_are_refused_with_the_file_and_key(
    tmp_path: Path, line: str, fragment: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'name = "t"\nmanifest = "m.csv"\n[augment]\n{line}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=fragment) as caught:
        load_config(path, TrainConfig)
    assert str(path) in str(caught.value) and "augment" in str(caught.value)
