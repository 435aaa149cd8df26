"""Training: augmentation, sampling, schedules, refusals of unusable data, and a real end-to-end
run (decode, train, validate, checkpoint, history, resume) on a tiny set of real radiographs."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_cxr.cli import main
from covid_cxr.config import AugmentConfig, OptimConfig, SamplingConfig, TrainConfig, load_config
from covid_cxr.data.dedup import file_sha256
from covid_cxr.data.manifest import ManifestRow, load_manifest, write_manifest
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.imaging import PreprocessConfig
from covid_cxr.models.checkpoint import load_checkpoint, read_checkpoint
from covid_cxr.paths import REPO_ROOT
from covid_cxr.training.augment import augment_batch, random_affine
from covid_cxr.training.classification import load_splits
from covid_cxr.training.cpu import cpu_threads
from covid_cxr.training.dataset import (
    EpochSampler,
    cache_folder,
    class_weights,
    decode_images,
    group_weights,
)
from covid_cxr.training.distributed import Context
from covid_cxr.training.history import binary_metrics
from covid_cxr.training.schedule import Schedule
from covid_cxr.training.steps import predict, to_channels_last
from train_helpers import real_rows, write_rows

CI_CONFIG = REPO_ROOT / "configs" / "train" / "ci.toml"

torch.set_num_threads(2)


# ---------------------------------------------------------------- augmentation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hflip_mirrors_about_half_of_the_images_exactly() -> None:
    x = torch.rand(64, 1, 16, 16)
    out = augment_batch(x, AugmentConfig(hflip=True), _gen(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 20 < sum(flipped) < 44


def test_flip_inside_the_affine_path_is_also_exact() -> None:
    x = torch.rand(32, 1, 16, 16)
    out = augment_batch(x, AugmentConfig(hflip=True, crop_scale=0.99999), _gen(3))
    for o, i in zip(out, x, strict=True):
        assert min(float((o - i).abs().max()), float((o - i.flip(-1)).abs().max())) < 1e-4


def test_zoom_draws_independent_axes_in_range_and_zooms_out_above_one() -> None:
    theta = random_affine(500, AugmentConfig(zoom=0.2), _gen(1))
    zx, zy = theta[:, 0, 0], theta[:, 1, 1]
    assert float(zx.min()) >= 0.8 and float(zx.max()) <= 1.2
    assert float(zx.min()) < 0.85 and float(zx.max()) > 1.15
    assert abs(float(np.corrcoef(zx, zy)[0, 1])) < 0.2  # independent, as in Keras
    assert float(theta[:, 0, 1].abs().max()) == 0 and float(theta[:, :, 2].abs().max()) == 0
    # Keras semantics: a factor above 1 samples a wider field, so a square looks smaller.
    square = torch.zeros(500, 1, 64, 64)
    square[..., 22:42, 22:42] = 1
    out = augment_batch(square, AugmentConfig(zoom=0.2), _gen(1))
    area = out.sum((1, 2, 3)) / 400
    torch.testing.assert_close(area, 1 / (zx * zy), rtol=0.12, atol=0.02)


def test_shear_is_read_in_degrees_like_keras() -> None:
    theta = random_affine(200, AugmentConfig(shear=0.2), _gen(2))
    assert float(theta[:, 1, 0].abs().max()) <= math.sin(math.radians(0.2)) + 1e-6
    assert float(theta[:, 1, 0].abs().max()) > 0.5 * math.sin(math.radians(0.2))


def test_augmentation_is_reproducible_from_its_seed_and_stays_in_range() -> None:
    config = AugmentConfig(
        hflip=True,
        zoom=0.2,
        shear=0.2,
        rotation=10,
        translate=0.1,
        crop_scale=0.7,
        brightness=0.2,
        contrast=0.3,
        gamma=0.3,
    )
    x = torch.rand(8, 1, 32, 32)
    a, b = augment_batch(x, config, _gen(5)), augment_batch(x, config, _gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, config, _gen(6)))
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and a.dtype == torch.float32


# ---------------------------------------------------------------- sampling and schedules


def test_source_balanced_sampler_draws_every_group_equally() -> None:
    groups = [("kaggle", 0)] * 900 + [("ieee", 1)] * 100
    sampler = EpochSampler(size=1000, seed=0, weights=group_weights(groups))
    order = sampler.global_order(epoch=1)
    share = float((order >= 900).float().mean())
    assert 0.45 < share < 0.55
    assert not torch.equal(order, sampler.global_order(epoch=2))


def test_process_batches_together_form_the_single_process_global_batch() -> None:
    single = EpochSampler(size=40, seed=3).batches(epoch=1, batch_size=8)
    ranks = [EpochSampler(size=40, seed=3, rank=r, world=2).batches(1, 8) for r in (0, 1)]
    for step, batch in enumerate(single):
        together = torch.cat([ranks[0][step], ranks[1][step]])
        assert sorted(together.tolist()) == sorted(batch.tolist())
    # Uneven totals are padded so every process takes part in every step.
    uneven = [EpochSampler(size=37, seed=3, rank=r, world=2).batches(1, 8) for r in (0, 1)]
    assert len(uneven[0]) == len(uneven[1]) == 5


def test_class_weights_balance_the_classes() -> None:
    weights = class_weights(torch.tensor([1.0] * 10 + [0.0] * 30))
    torch.testing.assert_close(weights, torch.tensor([40 / 60, 40 / 20]))


def test_schedules() -> None:
    cosine = Schedule(OptimConfig(lr=1e-3, schedule="cosine", warmup_epochs=1, min_lr=1e-5), 11)
    assert cosine.lr(0.5) == pytest.approx(5e-4)
    assert cosine.lr(1.0) == pytest.approx(1e-3)
    assert cosine.lr(6.0) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine.lr(11.0) == pytest.approx(1e-5)
    step = Schedule(OptimConfig(lr=1e-2, schedule="step", step_epochs=2, factor=0.5), 10)
    assert [step.lr(e) for e in (0, 1.9, 2, 4)] == pytest.approx([1e-2, 1e-2, 5e-3, 2.5e-3])
    plateau = Schedule(OptimConfig(lr=1e-3, schedule="plateau", plateau_patience=1), 10)
    for auc in (0.8, 0.7, 0.75):
        plateau.observe(auc)
    assert plateau.lr(3) == pytest.approx(1e-4)


def test_group_balanced_auc_counts_every_group_equally() -> None:
    # An easy majority source (perfectly separated) and a small hard one (scores reversed).
    targets = np.array([0] * 90 + [1] * 90 + [0] * 10 + [1] * 10, dtype=np.float32)
    logits = np.concatenate(
        [np.full(90, -2.0), np.full(90, 2.0), np.full(10, 1.0), np.full(10, -1.0)]
    )
    groups = [("big", 0)] * 90 + [("big", 1)] * 90 + [("small", 0)] * 10 + [("small", 1)] * 10
    plain = binary_metrics(targets, logits, 0.0)
    balanced = binary_metrics(targets, logits, 0.0, group_weights(groups).numpy())
    assert plain["auc"] > 0.9 and plain["acc"] == pytest.approx(0.9)
    # Group pairs: big-big 1, small-small 0, big+ vs small- 1, small+ vs big- 1 -> 0.75
    assert balanced["auc"] == pytest.approx(0.75)
    assert balanced["acc"] == pytest.approx(0.5)


def test_runtime_settings() -> None:
    # In a child process: the setting is process-wide and pytest's process is shared.
    code = "from covid_cxr.training.cpu import keep_freed_memory as k; print(k())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "True"  # Linux / glibc here
    assert cpu_threads(3) == 3
    x = to_channels_last(torch.rand(2, 1, 8, 8))
    assert x.stride() == (64, 1, 8, 1)  # true channels-last strides even for one channel
    out = torch.nn.functional.conv2d(x, torch.rand(4, 1, 3, 3))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


# ---------------------------------------------------------------- refusals


def _config(manifest: Path, **changes: object) -> TrainConfig:
    return dataclasses.replace(
        load_config(CI_CONFIG, TrainConfig), manifest=str(manifest), **changes
    )


def _rows(labels_splits: list[tuple[str, str]], tmp_path: Path) -> Path:
    rows = [
        ManifestRow(tmp_path / f"{i}.png", label, "src", f"p{i}", "PA", "", split)
        for i, (label, split) in enumerate(labels_splits)
    ]
    return write_manifest(tmp_path / "manifest.csv", rows, root=tmp_path)


def test_missing_manifest_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError, match="manifest not found"):
        load_splits(_config(tmp_path / "nope.csv"))
    code = main(["train", "--config", str(CI_CONFIG), "--manifest", str(tmp_path / "nope.csv")])
    assert code == 2
    assert "manifest not found" in capsys.readouterr().err


def test_empty_manifest_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    path.write_text("path,label,source,patient_id,view,sha256,split\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_splits(_config(path))


def test_one_class_manifest_is_a_clear_error(tmp_path: Path) -> None:
    path = _rows([("COVID", "train")] * 4 + [("COVID", "val"), ("Normal", "val")], tmp_path)
    with pytest.raises(DataError, match=r"train split\): all 4 images are COVID-19"):
        load_splits(_config(path))


def test_missing_validation_split_is_a_clear_error(tmp_path: Path) -> None:
    path = _rows([("COVID", "train"), ("Normal", "train"), ("Normal", "test")], tmp_path)
    with pytest.raises(DataError, match="no 'val' rows"):
        load_splits(_config(path))


def test_unknown_source_names_are_refused(tmp_path: Path) -> None:
    path = _rows([("COVID", "train"), ("Normal", "train")] * 2 + [("COVID", "val")], tmp_path)
    config = _config(path, sampling=SamplingConfig(exclude_sources=["hospital-x"]))
    with pytest.raises(ConfigError, match="hospital-x"):
        load_splits(config)


# ---------------------------------------------------------------- real end-to-end run


@pytest.fixture(scope="module")
def manifest(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 COVID-19 + 24 normal real radiographs, split by patient, plus one broken file."""
    folder = tmp_path_factory.mktemp("train-data")
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows = real_rows(datasets)
    rows.append(ManifestRow(broken, "Normal", "nih-chestxray8-subset", "x", "", "", "train"))
    return write_rows(folder / "manifest.csv", rows, datasets)


@pytest.fixture(scope="module")
def full_run(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "ci"
    code = main(
        [
            "train",
            "--config",
            str(CI_CONFIG),
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_training_run_leaves_a_complete_run_folder(full_run: Path) -> None:
    for name in ("config.toml", "history.csv", "history.png", "best.pt", "last.pt", "metrics.json"):
        assert (full_run / name).is_file(), name
    assert (full_run / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = load_config(full_run / "config.toml", TrainConfig)
    assert resolved.name == "ci" and resolved.preprocess.size == 64
    history = (full_run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,lr,train_loss,train_acc,train_auc,val_loss,val_acc,val_auc")
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["n_train"] + metrics["n_val"] == 48
    assert metrics["task"] == "classification" and metrics["selected_on"] == "val_auc"
    assert [Path(u["path"]).name for u in metrics["unreadable"]] == ["broken.png"]
    assert metrics["train_images_per_s"] > 0 and metrics["peak_rss_mib"] > 0
    # A real model learned something: these two sources are easy to tell apart.
    assert metrics["val_auc"] > 0.7


@pytest.mark.slow
def test_best_checkpoint_reloads_and_reproduces_its_validation_score(
    full_run: Path, manifest: Path
) -> None:
    model, info = load_checkpoint(full_run / "best.pt")
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert info.name == "seed-cnn" and info.options == {"size": 64}
    assert info.preprocess.size == 64
    assert info.version.startswith("ci-") and len(info.version.split("-")[-1]) == 8
    assert info.metadata["epoch"] == metrics["best_epoch"]
    assert info.metadata["task"] == "classification"
    config = load_config(full_run / "config.toml", TrainConfig)
    val = decode_images(
        [r for r in load_manifest(manifest) if r.split == "val"], config.preprocess, workers=0
    )
    context = Context(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    runtime = config.runtime
    logits, targets = predict(
        model,
        val,
        context,
        batch_size=runtime.eval_batch_size,
        bf16=runtime.bf16,
        channels_last=runtime.channels_last,
    )
    again = binary_metrics(targets, logits, 0.0)
    assert again["auc"] == pytest.approx(metrics["val_auc"], abs=1e-9)
    assert again["acc"] == pytest.approx(metrics["val_accuracy"], abs=1e-9)
    reloaded, _ = load_checkpoint(full_run / "best.pt")
    x = val.batch(torch.arange(4))[0]
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


@pytest.fixture(scope="module")
def one_epoch(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full run's first epoch alone: a last.pt to resume from."""
    out = tmp_path_factory.mktemp("one-epoch")
    base = ["train", "--config", str(CI_CONFIG), "--manifest", str(manifest), "--no-progress"]
    assert main([*base, "--out", str(out), "--epochs", "1"]) == 0
    assert read_checkpoint(out / "last.pt")["epoch"] == 1
    return out


def _resume_matches_the_uninterrupted_run(
    last: Path, full_run: Path, manifest: Path, out: Path
) -> None:
    base = ["train", "--config", str(CI_CONFIG), "--manifest", str(manifest), "--no-progress"]
    assert main([*base, "--out", str(out), "--resume", str(last)]) == 0
    resumed = read_checkpoint(out / "last.pt")
    straight = read_checkpoint(full_run / "last.pt")
    assert resumed["epoch"] == 2 and [r["epoch"] for r in resumed["history"]] == [1, 2]
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    for key in ("best_epoch", "best_score", "stale", "schedule"):
        assert resumed[key] == straight[key], key
    # Nothing left to do: asking to resume a finished run says so.
    assert main([*base, "--out", str(out), "--resume", str(out / "last.pt")]) == 2


@pytest.mark.slow
def test_resume_continues_from_the_next_epoch_and_matches_an_uninterrupted_run(
    full_run: Path, manifest: Path, one_epoch: Path, tmp_path: Path
) -> None:
    _resume_matches_the_uninterrupted_run(one_epoch / "last.pt", full_run, manifest, tmp_path)


@pytest.mark.slow
def test_last_pt_files_from_before_train_state_still_resume(
    full_run: Path, manifest: Path, one_epoch: Path, tmp_path: Path
) -> None:
    # What last.pt held before TrainState and tasks: "best_auc", no patience counter, no task.
    state = read_checkpoint(one_epoch / "last.pt")
    state["best_auc"] = state.pop("best_score")
    del state["stale"], state["info"]["metadata"]["task"]
    old = tmp_path / "old" / "last.pt"
    old.parent.mkdir()
    torch.save(state, old)
    _resume_matches_the_uninterrupted_run(old, full_run, manifest, tmp_path / "resumed")


def test_disk_cache_reuses_decoded_inputs_and_keys_them_by_preprocessing(
    manifest: Path, tmp_path: Path
) -> None:
    # The cache is keyed by the manifest's sha256 column (data build fills it in).
    rows = [
        dataclasses.replace(r, sha256=file_sha256(r.path))
        for r in load_manifest(manifest)
        if r.split == "val"
    ][:6]
    config = PreprocessConfig(size=48, intensity="equalize")
    first = decode_images(rows, config, workers=0, progress=False, cache_dir=tmp_path)
    folder = cache_folder(tmp_path, config, "float16")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r.sha256}.npy" for r in rows)
    # Mark one cached input: a second decode must read it instead of the radiograph.
    marked = folder / f"{rows[0].sha256}.npy"
    np.save(marked, np.full((48, 48), 0.25, dtype=np.float16))
    again = decode_images(rows, config, workers=0, progress=False, cache_dir=tmp_path)
    assert torch.all(again.images[0] == 0.25)
    assert torch.equal(again.images[1:], first.images[1:])
    # A damaged file is decoded again and replaced; another preprocessing gets its own folder.
    marked.write_bytes(b"not an array")
    repaired = decode_images(rows, config, workers=0, progress=False, cache_dir=tmp_path)
    assert torch.equal(repaired.images, first.images)
    assert cache_folder(tmp_path, PreprocessConfig(size=48), "float16") != folder
    assert cache_folder(tmp_path, config, "uint8") != folder
