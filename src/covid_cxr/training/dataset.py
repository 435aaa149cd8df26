"""Decode every image once into an in-memory tensor, and draw training batches from it.

Decoding and resizing a radiograph costs far more than a training step of a small CNN needs,
so each image goes through `read_radiograph` + `preprocess` (the same function evaluation and
inference use) exactly once, in worker processes, and is kept as uint8 or float16
(N, 1, S, S). Unreadable images are counted and reported, never fatal. With a `cache_dir`
each decoded input is also kept on disk, keyed by the image's sha256 and everything that shapes
it (preprocessing, cache dtype, lung segmenter), so that the next run on the same images (a
leave-source-out series, a rerun) skips decoding and segmentation.

Batch order is a pure function of (seed, epoch), identical on every process: under
`torchrun`, process r takes positions r, r + W, r + 2W, ... of the global order, so the
process batches of one step together form exactly the global batch a single process would use.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from covid_cxr.data.manifest import ManifestRow
from covid_cxr.errors import CovidCxrError, failure_reason
from covid_cxr.fileio import atomic_write_bytes
from covid_cxr.imaging import PreprocessConfig, read_radiograph
from covid_cxr.segmentation.inputs import model_input
from covid_cxr.segmentation.segmenter import DEFAULT_SEGMENTER

CACHE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16}


@dataclass
class Unreadable:
    path: str
    reason: str


class Split(Protocol):
    """One split of a task's data, decoded once and held in memory (what the loop needs)."""

    unreadable: list[Unreadable]  # files left out, reported in metrics.json

    def __len__(self) -> int: ...

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 inputs (N, C, S, S) in [0, 1] and their targets, un-augmented."""
        ...

    @property
    def sources(self) -> list[str]:
        """The sources (manifest `source` values) present, sorted."""
        ...

    def summary(self) -> str:
        """One line for the log: counts per class, unreadable files."""
        ...


@dataclass
class CachedImages:
    """Preprocessed images of one split with their targets and (source, label) groups."""

    images: torch.Tensor  # (N, 1, S, S) uint8 (x 255) or float16, in [0, 1]
    targets: torch.Tensor  # (N,) float32, 1 = COVID-19
    rows: list[ManifestRow]
    unreadable: list[Unreadable] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 images in [0, 1] and targets for the given positions."""
        images = self.images[index].float()
        if self.images.dtype == torch.uint8:
            images = images.mul_(1.0 / 255.0)
        return images, self.targets[index]

    @property
    def groups(self) -> list[tuple[str, int]]:
        """(source, target) per image: the strata the balanced sampler evens out. The binary
        target, not the finding, so that a source's handful of rare findings (ieee8023's SARS,
        Streptococcus, ...) is not drawn as often as a whole hospital."""
        return [(row.source, row.target) for row in self.rows]

    @property
    def sources(self) -> list[str]:
        return sorted({row.source for row in self.rows})

    def summary(self) -> str:
        covid = int(self.targets.sum().item())
        text = f"{len(self)} images ({covid} COVID-19, {len(self) - covid} other)"
        if self.unreadable:
            text += f", {len(self.unreadable)} unreadable left out"
        return text


def cache_folder(cache_dir: str | Path, config: PreprocessConfig, dtype: str) -> Path:
    """The folder of `cache_dir` holding inputs made by exactly this preprocessing."""
    recipe: dict[str, object] = {"preprocess": asdict(config), "dtype": dtype}
    if config.needs_lungs:
        recipe["segmenter"] = hashlib.sha256(DEFAULT_SEGMENTER.read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{config.size}px-{config.lungs}-{key}"


def _decode(task: tuple[str, PreprocessConfig, str, Path | None]) -> np.ndarray | str:
    """Worker: one file to a (S, S) array in the cache dtype, or the reason it failed."""
    path, config, dtype, cached = task
    if cached is not None and cached.is_file():
        try:
            return np.load(cached, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache file is decoded again and replaced
    try:
        # A lung-crop config loads the segmenter once per worker process, on first use.
        pixels = model_input(read_radiograph(path).pixels, config, source=path).pixels
    except (CovidCxrError, OSError, ValueError) as exc:
        return failure_reason(exc)
    if dtype == "uint8":
        result = np.rint(pixels * 255.0).astype(np.uint8)
    else:
        result = pixels.astype(np.float16)
    if cached is not None:
        buffer = io.BytesIO()
        np.save(buffer, result, allow_pickle=False)
        atomic_write_bytes(cached, buffer.getvalue())
    return result


def decode_images(
    rows: Sequence[ManifestRow],
    config: PreprocessConfig,
    dtype: str = "float16",
    workers: int = 2,
    desc: str = "decoding",
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> CachedImages:
    """Read and preprocess `rows` once; `workers` processes (0: in this process).

    `cache_dir`: reuse and keep decoded inputs there (see the module docstring); None: off.
    """
    folder = cache_folder(cache_dir, config, dtype) if cache_dir else None
    tasks = [
        (
            str(row.path),
            config,
            dtype,
            folder / f"{row.sha256}.npy" if folder and row.sha256 else None,
        )
        for row in rows
    ]
    images = torch.empty((len(rows), 1, config.size, config.size), dtype=CACHE_DTYPES[dtype])
    keep: list[int] = []
    unreadable: list[Unreadable] = []
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, leave=False)
    if workers > 0 and len(tasks) > 1:
        # spawn, not fork: forking a process that already runs torch (and maybe a process
        # group) can deadlock its thread pools in the child.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(_decode, tasks, chunksize=8)
            _collect(results, rows, images, keep, unreadable, bar)
    else:
        _collect(map(_decode, tasks), rows, images, keep, unreadable, bar)
    bar.close()
    index = torch.tensor(keep, dtype=torch.long)
    kept_rows = [rows[i] for i in keep]
    return CachedImages(
        images=images[index] if len(keep) < len(rows) else images,
        targets=torch.tensor([row.target for row in kept_rows], dtype=torch.float32),
        rows=kept_rows,
        unreadable=unreadable,
    )


def _collect(
    results: Iterable[np.ndarray | str],
    rows: Sequence[ManifestRow],
    images: torch.Tensor,
    keep: list[int],
    unreadable: list[Unreadable],
    bar: tqdm,
) -> None:
    for i, result in enumerate(results):
        if isinstance(result, str):
            unreadable.append(Unreadable(str(rows[i].path), result))
        else:
            images[i, 0] = torch.from_numpy(result)
            keep.append(i)
        bar.update()


def group_weights(groups: Sequence[tuple[str, int]]) -> torch.Tensor:
    """Sampling weight 1 / size of the image's group: every group equally likely."""
    sizes = Counter(groups)
    return torch.tensor([1.0 / sizes[g] for g in groups], dtype=torch.float64)


def class_weights(targets: torch.Tensor) -> torch.Tensor:
    """Loss weights (negative, positive) inversely proportional to class frequency, mean 1."""
    positives = float(targets.sum())
    negatives = float(len(targets)) - positives
    total = positives + negatives
    return torch.tensor([total / (2 * negatives), total / (2 * positives)], dtype=torch.float32)


@dataclass
class EpochSampler:
    """Global image order for an epoch (uniform shuffle or source-balanced draws), sharded."""

    size: int
    seed: int
    weights: torch.Tensor | None = None  # None: shuffle; else draw `epoch_size` with replacement
    epoch_size: int = 0
    rank: int = 0
    world: int = 1

    def global_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.weights is None:
            return torch.randperm(self.size, generator=generator)
        count = self.epoch_size or self.size
        return torch.multinomial(self.weights, count, replacement=True, generator=generator)

    def batches(self, epoch: int, batch_size: int) -> list[torch.Tensor]:
        """This process's batches; `batch_size` is the global batch (all processes together).

        The order is padded by repeating its start so that every process gets the same
        number of batches (DDP needs every process in every step).
        """
        order = self.global_order(epoch)
        step = batch_size
        total = -(-len(order) // step) * step if self.world > 1 else len(order)
        if total > len(order):
            order = torch.cat([order, order[: total - len(order)]])
        return [order[i : i + step][self.rank :: self.world] for i in range(0, total, step)]


def select_rows(
    rows: Sequence[ManifestRow],
    split: str,
    sources: Sequence[str] = (),
    exclude: Sequence[str] = (),
    limit: int = 0,
    seed: int = 0,
) -> list[ManifestRow]:
    """Rows of one split, optionally restricted to / without some sources, at most `limit`
    (a random subset keeping the class ratio, for quick runs)."""
    chosen = [
        r
        for r in rows
        if r.split == split and (not sources or r.source in sources) and r.source not in exclude
    ]
    if not limit or len(chosen) <= limit:
        return chosen
    rng = np.random.default_rng(seed)
    picked: list[ManifestRow] = []
    for target in (1, 0):
        group = [r for r in chosen if r.target == target]
        share = round(limit * len(group) / len(chosen))
        picked += [group[i] for i in sorted(rng.choice(len(group), share, replace=False))]
    return picked
