"""Checkpoints carry weights plus everything inference must repeat: preprocessing and thresholds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from covid_cxr import models
from covid_cxr.errors import ModelError
from covid_cxr.imaging import PreprocessConfig
from covid_cxr.models.checkpoint import (
    ModelInfo,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    update_info,
)

TEST_MODEL = "test-tiny"


def seed_info(**changes: object) -> ModelInfo:
    fields = {
        "name": "seed-cnn",
        "options": {"size": 32, "dropout": 0.1},
        "preprocess": PreprocessConfig(size=32, intensity="equalize", crop=0.9),
        "thresholds": {"default": 0.5, "youden": 0.41, "sensitivity_95": 0.18},
        "operating_point": "youden",
        "version": "test-1",
        "metadata": {"manifest": "data/m.csv", "val_auc": 0.91, "sources": ["a", "b"]},
    }
    return ModelInfo(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny seed-cnn whose weights differ from any fresh initialisation."""
    torch.manual_seed(0)
    model = models.create("seed-cnn", size=32, dropout=0.1)
    with torch.no_grad():
        for i, parameter in enumerate(model.parameters()):
            parameter.add_(0.01 * (i + 1))
    return model.eval()


@pytest.fixture
def saved(tmp_path: Path, trained: nn.Module) -> Path:
    path = tmp_path / "runs" / "seed" / "model.pt"  # parent folders do not exist yet
    save_checkpoint(path, trained, seed_info(), epoch=7, optimizer={"lr": 1e-3})
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name != "model.pt")


def test_save_and_load_give_back_the_same_model_and_info(saved: Path, trained: nn.Module) -> None:
    model, info = load_checkpoint(saved)
    assert info == seed_info()
    assert info.threshold == 0.41
    assert info.preprocess == PreprocessConfig(size=32, intensity="equalize", crop=0.9)
    assert not model.training
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert leftovers(saved.parent) == []


def test_extra_state_is_kept_for_resuming(saved: Path) -> None:
    data = read_checkpoint(saved)
    assert data["epoch"] == 7 and data["optimizer"] == {"lr": 1e-3}
    assert data["format"] == "covid-cxr/1"


def test_info_travels_as_json() -> None:
    info = seed_info()
    assert ModelInfo.from_dict(json.loads(info.to_json())) == info
    assert ModelInfo.from_dict({"name": "seed-cnn"}).threshold == 0.5


def test_update_info_changes_thresholds_in_place(saved: Path, trained: nn.Module) -> None:
    thresholds = {"default": 0.5, "youden": 0.37, "sensitivity_95": 0.12}
    returned = update_info(saved, thresholds=thresholds, operating_point="sensitivity_95")
    assert returned.threshold == 0.12
    model, info = load_checkpoint(saved)
    assert info == returned
    assert info.thresholds == thresholds and info.threshold == 0.12
    assert info.preprocess == seed_info().preprocess and info.version == "test-1"
    assert read_checkpoint(saved)["epoch"] == 7
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert leftovers(saved.parent) == []


@pytest.fixture
def tiny_registered() -> Iterator[list[dict]]:
    """A throwaway architecture in the registry that records how it was built."""
    calls: list[dict] = []

    @models.register(TEST_MODEL)
    def tiny(pretrained: bool = False, width: int = 4) -> nn.Module:
        calls.append({"pretrained": pretrained, "width": width})
        if pretrained:
            raise AssertionError("loading a checkpoint must not fetch pretrained weights")
        model = nn.Sequential(nn.Conv2d(1, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model.cam_layer = model[0]
        return model

    try:
        yield calls
    finally:
        models._REGISTRY.pop(TEST_MODEL, None)


def test_loading_never_asks_for_pretrained_weights(
    tmp_path: Path, tiny_registered: list[dict]
) -> None:
    model = models.create(TEST_MODEL, width=3)
    info = ModelInfo(name=TEST_MODEL, options={"width": 3, "pretrained": True})
    save_checkpoint(tmp_path / "tiny.pt", model, info)
    loaded, loaded_info = load_checkpoint(tmp_path / "tiny.pt")
    assert tiny_registered[-1] == {"pretrained": False, "width": 3}
    assert loaded_info.options == {"width": 3, "pretrained": True}
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_unknown_architecture_is_a_model_error(tmp_path: Path, tiny_registered: list) -> None:
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, models.create(TEST_MODEL), ModelInfo(name=TEST_MODEL))
    models._REGISTRY.pop(TEST_MODEL)  # as when a checkpoint outlives its architecture
    with pytest.raises(ModelError, match=r"unknown model 'test-tiny'.*seed-cnn"):
        load_checkpoint(path)


def refused(path: Path, fragment: str) -> None:
    for reader in (read_checkpoint, load_checkpoint, update_info):
        with pytest.raises(ModelError) as caught:
            reader(path)
        assert str(path) in str(caught.value) and fragment in str(caught.value)


def test_missing_file_is_a_model_error(tmp_path: Path) -> None:
    refused(tmp_path / "absent.pt", "not found")
    refused(tmp_path, "not found")  # a folder is not a checkpoint either


def test_random_bytes_are_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    refused(path, "not a readable PyTorch checkpoint")


def test_empty_file_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    refused(path, "not a readable PyTorch checkpoint")


def test_foreign_torch_file_is_a_model_error(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "plain_state_dict.pt"
    torch.save(trained.state_dict(), path)  # what most other projects save
    refused(path, "not a covid-cxr checkpoint")
