"""The pieces the training loop is made of: the task registry, the classification task,
TrainState (saved in last.pt and restored on resume), shards, and joint image+mask
augmentation (what a segmentation task relies on)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from covid_cxr import models
from covid_cxr.config import AugmentConfig, OptimConfig, SamplingConfig, TrainConfig, load_config
from covid_cxr.data.manifest import ManifestRow
from covid_cxr.errors import ConfigError
from covid_cxr.paths import REPO_ROOT
from covid_cxr.training import tasks
from covid_cxr.training.augment import augment_batch
from covid_cxr.training.classification import ClassificationTask
from covid_cxr.training.dataset import CachedImages, group_weights
from covid_cxr.training.distributed import Context, shard
from covid_cxr.training.history import binary_metrics
from covid_cxr.training.schedule import Schedule
from covid_cxr.training.state import TrainState
from covid_cxr.training.trainer import Trainer

CI_CONFIG = REPO_ROOT / "configs" / "train" / "ci.toml"


def _config(**changes: object) -> TrainConfig:
    return dataclasses.replace(load_config(CI_CONFIG, TrainConfig), **changes)


# ---------------------------------------------------------------- registry


def test_configs_default_to_classification_and_unknown_tasks_are_refused(tmp_path: Path) -> None:
    assert _config().task == "classification"
    assert "classification" in tasks.available()
    assert isinstance(tasks.create(_config()), ClassificationTask)
    with pytest.raises(ConfigError, match=r"unknown task 'lungs'.*available: classification"):
        Trainer(_config(task="lungs"), tmp_path)


def test_registering_a_taken_task_or_model_name_warns() -> None:
    before = dict(tasks._REGISTRY)
    try:
        with pytest.warns(UserWarning, match="task 'classification' registered twice"):
            tasks.register("classification")(lambda config: ClassificationTask(config))
    finally:
        tasks._REGISTRY.clear()
        tasks._REGISTRY.update(before)
    models.available()  # loads the built-in models
    original = models._REGISTRY["seed-cnn"]
    try:
        with pytest.warns(UserWarning, match="model 'seed-cnn' registered twice"):
            models.register("seed-cnn")(lambda **options: original(**options))
    finally:
        models._REGISTRY["seed-cnn"] = original


# ---------------------------------------------------------------- classification task


def _split(targets: list[int], sources: list[str]) -> CachedImages:
    rows = [
        ManifestRow(Path(f"{i}.png"), "COVID" if t else "Normal", s, f"p{i}", "PA", "", "val")
        for i, (t, s) in enumerate(zip(targets, sources, strict=True))
    ]
    n = len(rows)
    return CachedImages(torch.zeros(n, 1, 4, 4), torch.tensor(targets, dtype=torch.float32), rows)


def test_classification_loss_is_bce_with_optional_class_weights() -> None:
    train = _split([1, 0, 0, 0], ["a"] * 4)
    logits, targets = torch.tensor([0.3, -1.0, 2.0, 0.5]), train.targets
    plain = ClassificationTask(_config()).loss_function(train)
    torch.testing.assert_close(
        plain(logits, targets), F.binary_cross_entropy_with_logits(logits, targets)
    )
    balanced = _config(sampling=SamplingConfig(class_weights="balanced"))
    weighted = ClassificationTask(balanced).loss_function(train)
    weight = torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3])  # 4 / (2 * 1) positive, 4 / (2 * 3) negative
    expected = F.binary_cross_entropy_with_logits(logits, targets, weight=weight)
    torch.testing.assert_close(weighted(logits, targets), expected)


def test_classification_validation_metrics_include_the_balanced_auc_once() -> None:
    targets = [0] * 6 + [1] * 6 + [0, 1]
    sources = ["big"] * 12 + ["small"] * 2
    val = _split(targets, sources)
    logits = np.array([-2.0] * 6 + [2.0] * 6 + [1.0, -1.0], dtype=np.float32)
    y = val.targets.numpy()
    task = ClassificationTask(_config(select_metric="val_auc_balanced"))
    metrics = task.val_metrics(logits, y, val)
    plain = binary_metrics(y, logits, metrics["loss"])
    balanced = binary_metrics(y, logits, 0.0, group_weights(val.groups).numpy())
    assert {k: metrics[k] for k in ("loss", "acc", "auc")} == pytest.approx(plain)
    assert metrics["auc_balanced"] == pytest.approx(balanced["auc"])
    assert metrics["auc_balanced"] < metrics["auc"]  # the small source is scored backwards
    assert task.select_metric == "val_auc_balanced"
    row = {f"val_{k}": v for k, v in metrics.items()}
    assert task.result(row)["val_accuracy"] == metrics["acc"]
    assert task.result(None) == dict.fromkeys(task.result(row))


# ---------------------------------------------------------------- TrainState


def _row(epoch: int, auc: float) -> dict[str, float]:
    return {"epoch": epoch, "val_auc": auc, "train_loss": 1.0 / epoch}


def test_train_state_tracks_the_best_epoch_patience_and_plateau() -> None:
    optim = OptimConfig(schedule="plateau", plateau_patience=0, factor=0.5)
    state = TrainState(Schedule(optim, epochs=10))
    assert state.epoch == 0 and state.best is None
    improved = [state.record(_row(e, auc), auc) for e, auc in enumerate((0.6, 0.8, 0.7, 0.75), 1)]
    assert improved == [True, True, False, False]
    assert (state.epoch, state.best_epoch, state.best_score, state.stale) == (4, 2, 0.8, 2)
    assert state.best == _row(2, 0.8)
    assert state.schedule.plateau_scale == 0.25  # two epochs without a gain, patience 0


def test_train_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    optim = OptimConfig(schedule="plateau", plateau_patience=1, factor=0.1)
    state = TrainState(Schedule(optim, epochs=10))
    for epoch, auc in enumerate((0.6, 0.9, 0.7, 0.8, 0.85), 1):
        state.record(_row(epoch, auc), auc)
    path = tmp_path / "state.pt"
    torch.save({"epoch": state.epoch, **state.to_checkpoint()}, path)
    restored = TrainState.from_checkpoint(torch.load(path), Schedule(optim, epochs=10))
    assert restored == state
    assert restored.schedule.lr(5) == pytest.approx(state.schedule.lr(5))
    assert restored.schedule.plateau_scale == pytest.approx(0.1)


def test_train_state_reads_last_pt_files_from_before_it_existed() -> None:
    # The keys last.pt held before TrainState: best_auc, and no patience counter.
    old = {
        "epoch": 3,
        "history": [_row(1, 0.7), _row(2, 0.9), _row(3, 0.8)],
        "best_auc": 0.9,
        "best_epoch": 2,
        "schedule": {"plateau_scale": 0.5, "plateau_best": 0.9, "plateau_bad": 1},
    }
    state = TrainState.from_checkpoint(old, Schedule(OptimConfig(schedule="plateau"), 10))
    assert (state.epoch, state.best_epoch, state.best_score, state.stale) == (3, 2, 0.9, 1)
    assert state.schedule.state() == old["schedule"]
    assert not state.record(_row(4, 0.85), 0.85) and state.stale == 2


# ---------------------------------------------------------------- shards


def test_shards_cover_every_item_once_in_order() -> None:
    for length in (0, 1, 7, 12):
        for world in (1, 2, 3, 5):
            pieces = [
                list(range(length))[shard(Context(r, world, r, torch.device("cpu")), length)]
                for r in range(world)
            ]
            assert [i for piece in pieces for i in piece] == list(range(length))


# ---------------------------------------------------------------- joint image + mask augmentation

GEOMETRIC = AugmentConfig(hflip=True, zoom=0.2, shear=5, rotation=15, translate=0.1, crop_scale=0.6)


def _blobs(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """0/1 masks: one random rectangle each and a dot in the top left corner (so no mask is
    its own mirror image)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        top, left = torch.randint(4, size // 2, (2,), generator=g).tolist()
        height, width = torch.randint(8, size // 2, (2,), generator=g).tolist()
        masks[i, 0, top : top + height, left : left + width] = 1
        masks[i, 0, 1:3, 1:3] = 1
    return masks


def test_a_mask_follows_its_images_geometric_transform_exactly() -> None:
    masks = _blobs(16)
    images = masks.clone()  # an image that is its own mask: same transform, same result
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out_images, out_masks = augment_batch(images, GEOMETRIC, g1, masks=masks)
    assert torch.equal(out_masks, (out_images >= 0.5).float())
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0} and out_masks.dtype == torch.float32
    moved = [not torch.equal(o, m) for o, m in zip(out_masks, masks, strict=True)]
    assert sum(moved) == len(moved)  # every image really was transformed
    # Passing masks draws nothing extra: the images come out as without them.
    assert torch.equal(out_images, augment_batch(images, GEOMETRIC, g2))


def test_masks_follow_the_flip_and_skip_the_intensity_jitter() -> None:
    masks = _blobs(32, seed=1)
    noise = torch.rand(32, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    images = 0.25 + 0.25 * noise + 0.25 * masks
    flip_only = AugmentConfig(hflip=True, brightness=0.1, contrast=0.1, gamma=0.1)
    out_images, out_masks = augment_batch(
        images, flip_only, torch.Generator().manual_seed(2), masks
    )
    flipped = [torch.equal(o, m.flip(-1)) for o, m in zip(out_masks, masks, strict=True)]
    kept = [torch.equal(o, m) for o, m in zip(out_masks, masks, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True)) and 6 < sum(flipped) < 26
    for image, out, was_flipped in zip(images, out_images, flipped, strict=True):
        # The image was mirrored exactly when its mask was (its own noise tells which way).
        same, mirrored = (
            np.corrcoef(out.flatten(), x.flatten())[0, 1] for x in (image, image.flip(-1))
        )
        assert (mirrored > same) == was_flipped and max(same, mirrored) > 0.9
        assert not torch.equal(out, image) and not torch.equal(out, image.flip(-1))  # jittered
    # With geometry too: jitter changes the images but not the masks.
    jitter = dataclasses.replace(GEOMETRIC, brightness=0.3, contrast=0.3, gamma=0.3)
    _, plain_masks = augment_batch(images, GEOMETRIC, torch.Generator().manual_seed(3), masks)
    _, jitter_masks = augment_batch(images, jitter, torch.Generator().manual_seed(3), masks)
    assert torch.equal(plain_masks, jitter_masks)


def test_mask_area_scales_with_the_zoom_like_the_image() -> None:
    masks = _blobs(200, size=64, seed=5)
    zoom = AugmentConfig(zoom=0.2)
    images, out = augment_batch(masks.clone(), zoom, torch.Generator().manual_seed(6), masks)
    ratio = out.sum((1, 2, 3)) / masks.sum((1, 2, 3))
    image_ratio = images.sum((1, 2, 3)) / masks.sum((1, 2, 3))
    torch.testing.assert_close(ratio, image_ratio, rtol=0.1, atol=0.05)
    assert (
        float(ratio.min()) < 0.85
        and float(ratio.max()) > 1.1
        and not math.isnan(float(ratio.mean()))
    )
