"""Running the same training under `torchrun`: process group, device, and collective helpers.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) everything degrades to a single
process and no collective is ever called, so the single-machine path has no extra cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from covid_cxr.errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Only the main process logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def choose_device(preference: str, local_rank: int = 0) -> torch.device:
    """CUDA when present (one GPU per local process), else CPU; 'cpu'/'cuda' force it."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device = 'cuda' but no CUDA GPU is available")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device_preference: str = "auto") -> Context:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=30),  # the first epoch waits for every image to decode
        )
    return Context(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather(context: Context, value: Any) -> list[Any]:
    """Every process's `value`, in rank order (just [value] without a process group).

    Validation scores are gathered to every process, so each reaches the same early-stopping
    decision without a separate broadcast."""
    if not context.distributed:
        return [value]
    out: list[Any] = [None] * context.world
    dist.all_gather_object(out, value)
    return out


def shard(context: Context, length: int) -> slice:
    """This process's contiguous share of `length` items. Contiguous (not strided) shares, so
    that concatenating every process's results in rank order keeps the original order."""
    share = -(-length // context.world)
    return slice(context.rank * share, (context.rank + 1) * share)


def gather_arrays(context: Context, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each of `arrays` concatenated over every process in rank order (the inverse of `shard`);
    empty parts (a process with no share) are left out, whatever their shape."""
    parts = gather(context, arrays)
    return tuple(
        np.concatenate([p[i] for p in parts if len(p[i])] or [parts[0][i]])
        for i in range(len(arrays))
    )


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()
