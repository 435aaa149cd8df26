"""Model registry: every architecture behind one factory, `create(name, **options)`.

Every model takes a (N, 1, H, W) float batch in [0, 1] (the output of `preprocess`) and
returns (N,) logits for "COVID-19". Each exposes `cam_layer`, the convolutional module
Grad-CAM explains.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from covid_cxr.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make `factory(**options)` available as `create(name, ...)`; registering a
    different factory under a taken name warns (the later one wins)."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            warnings.warn(f"model {name!r} registered twice; the later one wins", stacklevel=2)
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from covid_cxr.models import efficientnet_lite, seed_cnn  # noqa: F401


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def accepts(name: str, option: str) -> bool:
    """Whether model `name` takes `option` (e.g. the seed CNN's input `size`)."""
    _load_builtin()
    return name in _REGISTRY and option in inspect.signature(_REGISTRY[name]).parameters


def create(name: str, **options: object) -> nn.Module:
    """Build model `name`; unknown names and options are refused with the valid choices."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:
        raise ModelError(f"model {name!r}: bad options {options}: {exc}") from exc
