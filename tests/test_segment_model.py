"""The lite0-unet segmenter: shapes, ImageNet initialisation, and a short real training run
through `covid-cxr train` exported to ONNX and used by LungSegmenter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_cxr.cli import main
from covid_cxr.config import TrainConfig, load_config
from covid_cxr.data.masks import load_mask_manifest, read_mask, write_mask_manifest
from covid_cxr.errors import ConfigError, ModelError
from covid_cxr.models import available, create
from covid_cxr.models.efficientnet_lite import pretrained_weights_path
from covid_cxr.segmentation import LungMask, LungSegmenter
from covid_cxr.segmentation.masks import dice
from covid_cxr.training.segmentation import SegmentationTask


def test_forward_gives_one_logit_per_pixel_at_the_input_size() -> None:
    model = create("lite0-unet", pretrained=False).eval()
    with torch.inference_mode():
        for size in (64, 96):
            assert model(torch.rand(2, 1, size, size)).shape == (2, 1, size, size)
    assert model.encoder.cam_layer is None
    assert "lite0-unet" in available("segmentation")
    assert "lite0-unet" not in available("classification")


def test_encoder_starts_from_imagenet_and_drops_the_classifier() -> None:
    model = create("lite0-unet", freeze_blocks=3)
    imagenet = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    state = model.state_dict()
    for key in ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_blocks.15._bn2.bias"):
        assert torch.equal(state[f"encoder.{key}"], imagenet[key])
    assert not any(k.startswith(("encoder._fc", "encoder._conv_head")) for k in state)
    assert not model.encoder._conv_stem.weight.requires_grad
    assert not any(p.requires_grad for p in model.encoder._blocks[2].parameters())
    assert all(p.requires_grad for p in model.encoder._blocks[3].parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    scratch = create("lite0-unet", pretrained=False).state_dict()
    assert not torch.equal(scratch["encoder._conv_stem.weight"], state["encoder._conv_stem.weight"])


TINY = """
name = "tiny-lungs"
task = "segmentation"
manifest = "{manifest}"
epochs = 1
batch_size = 4
select_metric = "val_dice_balanced"
[model]
name = "lite0-unet"
options = {{ pretrained = true, freeze_blocks = 3 }}
[preprocess]
size = 64
intensity = "equalize"
[augment]
rotation = 5.0
zoom = 0.1
[optim]
name = "adamw"
lr = 0.001
[sampling]
sampler = "source_balanced"
epoch_size = 8
[runtime]
decode_workers = 0
threads = 1
eval_batch_size = 8
"""


@pytest.fixture(scope="module")
def tiny_run(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real masks per source for training, one per source for validation."""
    from covid_cxr.config import SplitConfig
    from covid_cxr.data.masks import read_mask_sources, split_masks

    root = tmp_path_factory.mktemp("tiny-lungs")
    records = split_masks(read_mask_sources(datasets, ["jsrt"]), SplitConfig(seed=1))
    picked = [r for r in records if r.split == "train"][:4] + [
        r for r in records if r.split == "val"
    ][:2]
    manifest = write_mask_manifest(root / "manifest.csv", picked, datasets)
    config = root / "tiny.toml"
    config.write_text(TINY.format(manifest=manifest.as_posix()))
    out = root / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    return out


def test_short_training_run_leaves_a_segmentation_run_folder(tiny_run: Path) -> None:
    for name in ("best.pt", "last.pt", "history.csv", "history.png", "metrics.json"):
        assert (tiny_run / name).is_file(), name
    header = (tiny_run / "history.csv").read_text().splitlines()[0]
    assert "val_dice_balanced" in header and "val_dice_jsrt" in header
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["task"] == "segmentation"
    assert 0.0 <= metrics["val_dice"] <= 1.0
    assert metrics["val_dice_openist"] is None  # no OpenIST images in this run


def test_exported_run_segments_radiographs_at_their_own_size(
    tiny_run: Path, datasets: Path
) -> None:
    from covid_cxr.inference.export import export_model

    onnx = tiny_run / "lungs.onnx"
    results = export_model(tiny_run, onnx)
    assert results["max_logit_difference"] < 1e-4
    segmenter = LungSegmenter(onnx)
    assert segmenter.info.metadata["task"] == "segmentation"
    image = datasets / "openist-normal" / "images" / "1-10-500-500-100.jpg"
    lungs = segmenter.segment(image)
    truth = read_mask(datasets / "openist-normal" / "masks" / "1-10-500-500-100.png")
    assert isinstance(lungs, LungMask) and lungs.mask.shape == truth.shape
    assert 0.0 <= dice(lungs.mask, truth) <= 1.0  # one epoch on 4 images: any value


def test_segmentation_config_needs_a_dice_selection_metric(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(TINY.format(manifest="x.csv").replace('"val_dice_balanced"', '"val_auc"'))
    with pytest.raises(ConfigError, match="val_dice"):
        SegmentationTask(load_config(config, TrainConfig))


def test_classifier_files_are_refused_as_segmenters(tmp_path: Path) -> None:
    from inference_helpers import build

    classifier = build("seed-cnn", tmp_path).onnx
    with pytest.raises(ModelError, match="not a lung segmenter"):
        LungSegmenter(classifier)
    with pytest.raises(ModelError, match="not found"):
        LungSegmenter(tmp_path / "missing.onnx")


def test_mask_manifest_round_trip(datasets: Path, tmp_path: Path) -> None:
    from covid_cxr.data.masks import MaskRecord

    record = MaskRecord(
        datasets / "jsrt/images/JPCLN009.png",
        datasets / "jsrt/masks/JPCLN009.png",
        "jsrt",
        "jsrt:JPCLN009",
        "test",
    )
    path = write_mask_manifest(tmp_path / "m.csv", [record], datasets)
    assert load_mask_manifest(path, root=datasets) == [record]
    assert np.asarray(read_mask(record.mask)).dtype == bool
