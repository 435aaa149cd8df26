"""Decode every image once, in parallel: is it readable, and what are its perceptual hashes.

Results are cached per sha256 in a JSON file next to the manifest, so a rebuild only decodes
images it has not seen (a changed file has a new sha256; a new reader version drops the cache).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from covid_cxr import __version__
from covid_cxr.data.dedup import file_sha256, phashes
from covid_cxr.errors import RadiographError
from covid_cxr.fileio import atomic_write_text

CACHE_NAME = ".fingerprints.json"
_CACHE_VERSION = f"phash-v1/covid-cxr-{__version__}"


@dataclass(frozen=True)
class Fingerprint:
    """What the build needs to know about one file: identity, hashes, or why it is unreadable."""

    sha256: str
    phash: int | None = None
    square_phash: int | None = None
    error: str | None = None


def _decode(path: str) -> tuple[int | None, int | None, str | None]:
    from covid_cxr.imaging import read_radiograph

    try:
        pixels = read_radiograph(path).pixels
    except RadiographError as exc:
        return None, None, exc.reason
    except OSError as exc:
        return None, None, f"cannot read the file: {exc.strerror or exc}"
    full, square = phashes(pixels)
    return full, square, None


def _decode_chunk(paths: list[str]) -> list[tuple[int | None, int | None, str | None]]:
    return [_decode(path) for path in paths]


def fingerprint(
    paths: Sequence[Path],
    *,
    workers: int = 2,
    cache_file: Path | None = None,
    progress: bool = True,
) -> tuple[list[Fingerprint], int]:
    """Fingerprints of `paths` (same order) and how many images had to be decoded."""
    shas = [file_sha256(path) for path in paths]
    cache = _load_cache(cache_file)
    todo: dict[str, str] = {}
    for path, sha in zip(paths, shas, strict=True):
        if sha not in cache:
            todo.setdefault(sha, str(path))
    results = _run(list(todo.values()), workers, progress)
    for sha, (full, square, error) in zip(todo, results, strict=True):
        cache[sha] = (full, square, error)
    if cache_file is not None and todo:
        _save_cache(cache_file, cache)
    prints = [Fingerprint(sha, *cache[sha]) for sha in shas]
    return prints, len(todo)


def _run(
    paths: list[str], workers: int, progress: bool
) -> list[tuple[int | None, int | None, str | None]]:
    bar = tqdm(total=len(paths), unit="img", desc="decoding", disable=not progress or not paths)
    if workers <= 1 or len(paths) < 64:
        results = []
        for path in paths:
            results.append(_decode(path))
            bar.update()
        bar.close()
        return results
    size = max(16, min(128, len(paths) // (workers * 8) or 1))
    chunks = [paths[start : start + size] for start in range(0, len(paths), size)]
    done: dict[int, list] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_decode_chunk, chunk): index for index, chunk in enumerate(chunks)}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            bar.update(len(done[futures[future]]))
    bar.close()
    return [result for index in range(len(chunks)) for result in done[index]]


def _load_cache(path: Path | None) -> dict[str, tuple[int | None, int | None, str | None]]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    return {sha: tuple(entry) for sha, entry in data.get("entries", {}).items()}


def _save_cache(path: Path, cache: dict) -> None:
    atomic_write_text(path, json.dumps({"version": _CACHE_VERSION, "entries": cache}))
