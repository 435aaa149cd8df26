"""Saving and loading trained models with everything inference needs to repeat training.

A checkpoint is a `torch.save`d dict of weights plus a `ModelInfo` (covid_cxr.models.info).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from covid_cxr.errors import ModelError
from covid_cxr.fileio import atomic_path
from covid_cxr.models.info import ModelInfo


def save_checkpoint(path: str | Path, model: nn.Module, info: ModelInfo, **extra: Any) -> None:
    """Write model weights and `info`; `extra` (optimizer state, epoch, ...) is kept for resume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(
            {"format": "covid-cxr/1", "info": info.to_dict(), "state_dict": state, **extra}, tmp
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (for resuming); refuses files that are not our checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != "covid-cxr/1":
        raise ModelError(f"{path}: not a covid-cxr checkpoint (train one with `covid-cxr train`)")
    return data


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model from the registry, load its weights, and return it in eval mode."""
    from covid_cxr.models import create

    data = read_checkpoint(path)
    info = ModelInfo.from_dict(data["info"])
    model = create(info.name, **{**info.options, "pretrained": False})
    model.load_state_dict(data["state_dict"])
    model.eval()
    return model, info


def update_info(path: str | Path, **changes: Any) -> ModelInfo:
    """Change fields of a saved checkpoint's info in place (e.g. thresholds chosen by evaluate)."""
    data = read_checkpoint(path)
    info = ModelInfo.from_dict({**data["info"], **changes})
    data["info"] = info.to_dict()
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return info
