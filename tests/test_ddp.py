"""`covid-cxr train` under torchrun: 2 CPU processes (gloo) learn exactly what one process learns
with the same global batch.

Deterministic on purpose: no augmentation, no dropout, fp32. The seed CNN has no batch norm, so
DDP's gradient averaging over the two half-batches equals the gradient of the whole batch. SGD
rather than Adam: Adam divides each step by the gradient's own size, so for the few weights whose
gradient is ~0 the last-bit difference between summing 8 and averaging 2x4 per-image gradients
becomes a visible step, while SGD keeps the comparison about the gradients.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covid_cxr.config import (
    AugmentConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
    dump_toml,
    load_config,
    to_dict,
)
from covid_cxr.models import create
from covid_cxr.models.checkpoint import read_checkpoint
from covid_cxr.paths import REPO_ROOT
from covid_cxr.training.trainer import Trainer
from train_helpers import real_rows, write_rows


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(
    datasets: Path, tmp_path: Path
) -> None:
    manifest = write_rows(tmp_path / "manifest.csv", real_rows(datasets), datasets)
    config = dataclasses.replace(
        load_config(REPO_ROOT / "configs" / "train" / "ci.toml", TrainConfig),
        manifest=str(manifest),
        model=ModelConfig("seed-cnn", {"dropout": 0.0, "dense_dropout": 0.0}),
        augment=AugmentConfig(),
        optim=OptimConfig(name="sgd", lr=0.01),
        epochs=1,
        batch_size=8,
        max_images=32,  # 32 training images: 4 full global batches
        runtime=RuntimeConfig(bf16=False, threads=1, decode_workers=0, reuse_memory=False),
    )
    path = tmp_path / "ddp.toml"
    path.write_text(dump_toml(to_dict(config)), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "covid_cxr.cli",
        "train",
        "--config",
        str(path),
        "--out",
        str(tmp_path / "ddp"),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cpu x2" in result.stderr  # really two processes, logged once by rank 0

    Trainer(config, tmp_path / "single", progress=False).run()
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")
    single = read_checkpoint(tmp_path / "single" / "last.pt")
    torch.manual_seed(config.seed)
    initial = create("seed-cnn", size=64).state_dict()  # what both runs started from
    assert ddp["history"][0]["epoch"] == single["history"][0]["epoch"] == 1
    for key, value in single["state_dict"].items():
        assert not torch.equal(value, initial[key]), f"{key} did not train"
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5)
    assert ddp["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"])
    assert ddp["history"][0]["val_auc"] == pytest.approx(single["history"][0]["val_auc"])
