"""Draw what training augmentation does to one real radiograph, for people to check by eye.

    python scripts/augment_examples.py      # writes docs/results/augmentation/examples.png

A 3 x 3 grid: the preprocessed radiograph (top left) and 8 augmented versions of it. The
preprocessing and the geometric and exposure changes are the default recipe's
(configs/train/default.toml); blur, noise, borders and overlays are turned on at the strengths
below, which are examples and not any recipe's choice. The default image is JSRT JPCNN001
(Shiraishi et al., AJR 2000; free for research and education).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from covid_cxr.config import AugmentConfig, TrainConfig, load_config
from covid_cxr.imaging import preprocess, read_radiograph
from covid_cxr.paths import REPO_ROOT, data_root
from covid_cxr.training.augment import augment_batch

RECIPE = REPO_ROOT / "configs" / "train" / "default.toml"
SOURCE_CHANGES = {"blur": 0.5, "noise": 0.03, "overlays": 0.7, "borders": 0.5}
GAP = 4  # pixels between the tiles, mid-grey so that black and white bands both show


def examples(image: np.ndarray, config: AugmentConfig, count: int, seed: int) -> np.ndarray:
    """(count, S, S) augmented versions of one preprocessed (S, S) image."""
    batch = torch.from_numpy(image).expand(count, 1, *image.shape).contiguous()
    generator = torch.Generator().manual_seed(seed)
    return augment_batch(batch, config, generator)[:, 0].numpy()


def grid(tiles: list[np.ndarray], columns: int) -> Image.Image:
    """Tiles in [0, 1] laid out row by row as one 8-bit greyscale picture."""
    size = tiles[0].shape[0]
    rows = -(-len(tiles) // columns)
    step = size + GAP
    canvas = Image.new("L", (columns * step - GAP, rows * step - GAP), 128)
    for i, tile in enumerate(tiles):
        pixels = Image.fromarray(np.round(tile * 255).astype(np.uint8))
        canvas.paste(pixels, ((i % columns) * step, (i // columns) * step))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=data_root() / "jsrt/images/JPCNN001.png")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs/results/augmentation/examples.png"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    recipe = load_config(RECIPE, TrainConfig)
    config = dataclasses.replace(recipe.augment, **SOURCE_CHANGES)
    image = preprocess(read_radiograph(args.image).pixels, recipe.preprocess)
    tiles = [image, *examples(image, config, 8, args.seed)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(tiles, columns=3).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
