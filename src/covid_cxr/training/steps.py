"""One training step and one scoring pass, for any task: each takes only the settings it uses.

`train_step` gets inputs already augmented and a loss function from the task
(covid_cxr.training.tasks), so the same step trains a classifier or a segmenter.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from covid_cxr.training import distributed
from covid_cxr.training.dataset import Split
from covid_cxr.training.distributed import Context

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(float32 model outputs, targets on the same device) -> scalar loss."""

Keep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(outputs, targets) of a batch -> what an epoch's metrics are computed from."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Channels-last strides, also for one channel: there `.contiguous(channels_last)` is a no-op
    that keeps channels-first strides, so the first convolution writes a channels-first map and
    every later layer pays for reordering it (forward and backward)."""
    if x.shape[1] == 1:
        n, _, h, w = x.shape
        return x.contiguous().reshape(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def autocast(bf16: bool, device: torch.device) -> AbstractContextManager[object]:
    """bfloat16 autocast on `device` when `bf16`, else nothing."""
    if not bf16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return to_channels_last(images) if channels_last else images


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_function: LossFunction,
    device: torch.device,
    *,
    bf16: bool,
    channels_last: bool,
) -> tuple[float, torch.Tensor]:
    """Forward (bf16 autocast), loss, backward, update, on an already augmented batch.

    Returns the batch loss and the float32 outputs (detached, on `device`) for the epoch's
    training metrics.
    """
    x = prepare(inputs, device, channels_last)
    y = targets.to(device)
    with autocast(bf16, device):
        outputs = model(x)
    loss = loss_function(outputs.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), outputs.detach().float()


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Split,
    context: Context,
    *,
    batch_size: int,
    bf16: bool,
    channels_last: bool,
    keep: Keep | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Outputs and targets of a whole split, in its order (each process scores its share).

    `keep` reduces each batch's (outputs, targets) before they are gathered (a task's
    `keep`); by default both are kept whole.
    """
    model.eval()
    mine = torch.arange(len(data))[distributed.shard(context, len(data))]
    outputs, targets = [], []
    for start in range(0, len(mine), batch_size):
        inputs, y = data.batch(mine[start : start + batch_size])
        with autocast(bf16, context.device):
            out = model(prepare(inputs, context.device, channels_last)).float()
        out, y = keep(out, y.to(out.device)) if keep else (out, y)
        outputs.append(out.cpu())
        targets.append(y.cpu())
    if not outputs:  # more processes than images: this one has none
        empty = np.empty(0, dtype=np.float32)
        return distributed.gather_arrays(context, empty, empty)  # type: ignore[return-value]
    local = torch.cat(outputs).numpy(), torch.cat(targets).numpy()
    return distributed.gather_arrays(context, *local)  # type: ignore[return-value]
