"""Wall time of `covid-cxr data build` on the default recipe over the shared datasets.

Runs the whole build (read sources, decode and hash every image, group, split) cold, without
a cache, with 1 decoding process (the baseline) and with N processes, then once more warm
(every image's hashes cached), and prints the times and the speed-ups.
Goal (issue 2): the cold default build in under a minute on a 2-core machine.

    python benchmarks/data_build.py [--recipe configs/data/default.toml] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from covid_cxr.config import DataRecipe, load_config
from covid_cxr.data.build import build_dataset
from covid_cxr.data.fingerprint import CACHE_NAME
from covid_cxr.paths import REPO_ROOT, data_root


def timed(recipe: DataRecipe, workers: int, cache: Path | None) -> tuple[float, int, dict]:
    start = time.perf_counter()
    result = build_dataset(
        recipe, data_root=data_root(), workers=workers, cache_file=cache, progress=False
    )
    return time.perf_counter() - start, len(result.rows), result.timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO_ROOT / "configs/data/default.toml")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    recipe = load_config(args.recipe, DataRecipe)
    print(
        f"recipe {recipe.name}, data {data_root()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / CACHE_NAME
        base, images, _ = timed(recipe, 1, None)
        cold, _, timings = timed(recipe, args.workers, cache)
        warm, _, _ = timed(recipe, args.workers, cache)
    print(f"{images} images in the manifest")
    print(f"cold, 1 process (baseline):   {base:6.1f} s")
    print(
        f"cold, {args.workers} processes:           {cold:6.1f} s  ({base / cold:.2f}x)  "
        + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items())
    )
    print(f"warm (hashes cached):         {warm:6.1f} s  ({base / warm:.1f}x)")
    print(f"goal: cold build under 60 s -> {'met' if cold < 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
