"""Training speed of the seed CNN at batch 32 on this CPU: this project's loop vs plain PyTorch.

Prints training images/s for, on the same real radiographs (224 px):
  plain       a straightforward PyTorch port of the Keras model (3-channel replicated input,
              ReLU -> pool -> nn.Dropout, NCHW), eager fp32, plain Adam step: what the team
              measured at 6-8.5 img/s;
  plain-ours  the project's model definition in the same plain fp32 loop;
  plain-reuse the plain port again once freed memory stays in the heap
              (`covid_cxr.training.cpu.keep_freed_memory`, process-wide, hence measured after);
  project     the project's training step (`covid_cxr.training.steps.train_step`):
              augmentation included, bf16 autocast, channels_last, heap reuse;
and the ratio; the default model (EfficientNet-Lite0, configs/train/default.toml) in the
project loop for reference; peak resident memory; and a bf16-vs-fp32 parity check: the same
N steps from the same initial weights and batches, then loss and accuracy on held-out images.
The Keras/TensorFlow original trains at 13-14.5 img/s on this 2-core machine (team measurement;
TensorFlow is not installed here). Other processes share the CPU: the load average is printed;
run it twice.

    python benchmarks/train_speed.py [--steps 10] [--parity-steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covid_cxr.config import AugmentConfig, RuntimeConfig, TrainConfig, load_config
from covid_cxr.data.manifest import ManifestRow
from covid_cxr.data.sources import open_source
from covid_cxr.imaging import PreprocessConfig
from covid_cxr.models import create
from covid_cxr.paths import REPO_ROOT, data_root
from covid_cxr.training.classification import ClassificationTask
from covid_cxr.training.cpu import keep_freed_memory
from covid_cxr.training.dataset import CachedImages, decode_images
from covid_cxr.training.history import binary_metrics
from covid_cxr.training.schedule import make_optimizer
from covid_cxr.training.steps import autocast, prepare, train_step
from covid_cxr.training.trainer import peak_rss_mib

KERAS_IMG_S = (13.0, 14.5)
BATCH = 32


class PlainKerasPort(nn.Module):
    """The obvious PyTorch transcription of the Keras model, for the baseline."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Conv2d(64, 128, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
            nn.Linear(26 * 26 * 128, 64),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(64, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1)).squeeze(1)


def real_images(count: int) -> CachedImages:
    """`count` real radiographs, half Hannover COVID-19, half NIH normals, decoded at 224 px."""
    root = data_root()
    covid = open_source("hannover", root / "covid-19-image-repository").read().records
    normal = [
        r
        for r in open_source("nih", root / "nih-chestxray8-subset").read().records
        if r.label == "Normal"
    ]
    picked = sorted(covid, key=lambda r: r.path)[: count // 2]
    picked += sorted(normal, key=lambda r: r.path)[: count - len(picked)]
    rows = [
        ManifestRow(r.path, r.label, r.source, r.patient_id, r.view, "", "train") for r in picked
    ]
    return decode_images(rows, PreprocessConfig(size=224), workers=2, desc="decoding")


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> float:  # type: ignore[no-untyped-def]
    loss = F.binary_cross_entropy_with_logits(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def project_step(  # type: ignore[no-untyped-def]
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    train: CachedImages,
    generator: torch.Generator,
):
    """The trainer's step for `config`: the classification task's augmentation and loss, then
    `train_step` with the config's bf16 / channels-last settings, on the CPU."""
    task = ClassificationTask(config)
    loss_function = task.loss_function(train)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        inputs, targets = task.augment(x, y, generator)
        return train_step(
            model,
            optimizer,
            inputs,
            targets,
            loss_function,
            torch.device("cpu"),
            bf16=config.runtime.bf16,
            channels_last=config.runtime.channels_last,
        )

    return step


def batches(data: CachedImages, steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(len(data), (BATCH,), generator=g) for _ in range(steps)]


def time_loop(step, data: CachedImages, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Images/s over `steps` steps after two warm-up steps (first-call setup excluded)."""
    order = batches(data, steps + 2, seed=1)
    for index in order[:2]:
        step(*data.batch(index))
    start = time.perf_counter()
    for index in order[2:]:
        step(*data.batch(index))
    return steps * BATCH / (time.perf_counter() - start)


def measure(data: CachedImages, config: TrainConfig, steps: int) -> dict[str, float]:
    results = {}

    torch.manual_seed(0)
    plain = PlainKerasPort()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    results["plain"] = time_loop(lambda x, y: plain_step(plain, opt, x, y), data, steps)

    torch.manual_seed(0)
    ours = create("seed-cnn")
    opt = torch.optim.Adam(ours.parameters(), lr=1e-3)
    results["plain-ours"] = time_loop(lambda x, y: plain_step(ours, opt, x, y), data, steps)

    # From here on freed memory stays in the heap (process-wide, so the plain loops ran first).
    results["heap-reuse"] = keep_freed_memory()
    torch.manual_seed(0)
    plain = PlainKerasPort()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    results["plain-reuse"] = time_loop(lambda x, y: plain_step(plain, opt, x, y), data, steps)

    torch.manual_seed(0)
    project = create("seed-cnn").to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(project.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    results["project"] = time_loop(project_step(project, opt, config, data, g), data, steps)

    results["seed-rss"] = peak_rss_mib()
    # The default model in the same loop, with configs/train/default.toml's settings.
    default = load_config(REPO_ROOT / "configs" / "train" / "default.toml", TrainConfig)
    torch.manual_seed(0)
    lite0 = create(default.model.name, **default.model.options)
    lite0 = lite0.to(memory_format=torch.channels_last)
    opt = make_optimizer(lite0, default.optim)
    results["efficientnet"] = time_loop(project_step(lite0, opt, default, data, g), data, steps)
    return results


def parity(data: CachedImages, held_out: CachedImages, config: TrainConfig, steps: int) -> None:
    """Same initial weights, batches, augmentation and dropout draws; bf16 vs fp32."""
    cpu = torch.device("cpu")
    print(f"\nparity: {steps} steps from the same start, then {len(held_out)} held-out images")
    for name, bf16 in (("fp32", False), ("bf16", True)):
        cfg = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, bf16=bf16))
        torch.manual_seed(0)
        model = create("seed-cnn").to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        step = project_step(model, opt, cfg, data, torch.Generator().manual_seed(0))
        losses = [step(*data.batch(index))[0] for index in batches(data, steps, seed=2)]
        model.eval()
        with torch.no_grad(), autocast(bf16, cpu):
            images = held_out.batch(torch.arange(len(held_out)))[0]
            logits = model(prepare(images, cpu, cfg.runtime.channels_last))
        targets = held_out.targets.numpy()
        logits_np = logits.float().numpy()
        m = binary_metrics(
            targets,
            logits_np,
            float(F.binary_cross_entropy_with_logits(logits.float(), held_out.targets)),
        )
        print(
            f"  {name}: train loss first 5 steps {np.mean(losses[:5]):.4f}, last 5 steps "
            f"{np.mean(losses[-5:]):.4f}; held-out loss {m['loss']:.4f} accuracy {m['acc']:.3f} "
            f"AUC {m['auc']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    parser.add_argument("--parity-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=160, help="real images to decode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    everything = real_images(args.images)
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))
    split = int(len(order) * 0.75)
    train = CachedImages(
        everything.images[order[:split]],
        everything.targets[order[:split]],
        [everything.rows[i] for i in order[:split]],
    )
    held_out = CachedImages(
        everything.images[order[split:]],
        everything.targets[order[split:]],
        [everything.rows[i] for i in order[split:]],
    )
    config = TrainConfig(
        name="speed",
        manifest="-",
        preprocess=PreprocessConfig(size=224),
        augment=AugmentConfig(hflip=True, shear=0.2, zoom=0.2),
        runtime=RuntimeConfig(bf16=True, channels_last=True),
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {os.getloadavg()[0]:.2f} (other processes share the CPU)"
    )
    print(
        f"seed CNN, batch {BATCH}, 224x224, {args.steps} timed steps per loop, "
        f"{len(train)} real training images"
    )
    results = measure(train, config, args.steps)
    project, plain = results["project"], results["plain"]
    reuse = "on" if results["heap-reuse"] else "unavailable"
    print(f"  plain PyTorch port, eager fp32              {plain:6.1f} img/s   (baseline)")
    print(f"  project model, plain eager fp32             {results['plain-ours']:6.1f} img/s")
    print(f"  plain PyTorch port, fp32, heap reuse {reuse:>3}  {results['plain-reuse']:6.1f} img/s")
    print("  project loop: augment, bf16, channels_last,")
    print(f"    heap reuse {reuse}                          {project:6.1f} img/s")
    print(f"  ratio project loop / plain PyTorch          {project / plain:6.2f}x")
    print(f"  efficientnet-lite0, default.toml settings   {results['efficientnet']:6.1f} img/s")
    keras = sum(KERAS_IMG_S) / 2
    print(
        f"  vs Keras/TF {KERAS_IMG_S[0]}-{KERAS_IMG_S[1]} img/s (reference, not measured here): "
        f"{project / keras:.2f}x; goal >= 2x, i.e. >= 29 img/s"
    )
    parity(train, held_out, config, args.parity_steps)
    print(
        f"\npeak resident memory: {results['seed-rss']:.0f} MiB after the seed CNN loops, "
        f"{peak_rss_mib():.0f} MiB at the end (freed memory stays in the heap); "
        f"load average now {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
