"""Batch prediction: find the images, decode them in parallel, run the model in batches.

A file that cannot be read becomes a `Failure` with its reason; it never stops the batch.
Decoding runs in a thread pool (Pillow, pydicom's codecs and numpy release the GIL for the
heavy parts; processes would only add the cost of shipping pixel arrays back) a bounded
number of images ahead of the model, so memory stays flat however many files there are.
"""

from __future__ import annotations

import glob
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from covid_cxr.errors import error_code, failure_reason
from covid_cxr.inference.predictor import Prediction, Predictor, PreparedImage

# What a folder walk picks up; files named explicitly or by a glob are always tried.
# Extensionless files are included because DICOM archives often name files by UID alone.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""})
_GLOB_CHARS = frozenset("*?[")

T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """An input that produced no prediction, and why."""

    source: str
    reason: str
    code: str = "unreadable_file"  # errors.error_code of the cause (as UnreadableFileError)


@dataclass
class Inputs:
    files: list[Path]
    failures: list[Failure]  # arguments that name nothing
    skipped: int  # files inside folders ignored for their extension


def _walk(folder: Path) -> tuple[list[Path], int]:
    files, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.parts[-1:]):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        else:
            skipped += 1
    return files, skipped


def gather(arguments: Sequence[str]) -> Inputs:
    """Expand files, folders (recursively) and globs into a de-duplicated list of files."""
    files: list[Path] = []
    failures: list[Failure] = []
    skipped = 0
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found, ignored = _walk(path)
            files += found
            skipped += ignored
        elif path.is_file():
            files.append(path)
        elif _GLOB_CHARS & set(argument):
            matches = sorted(Path(m) for m in glob.glob(argument, recursive=True))
            matched = [m for m in matches if m.is_file()]
            for folder in (m for m in matches if m.is_dir()):
                found, ignored = _walk(folder)
                matched += found
                skipped += ignored
            if matched:
                files += matched
            else:
                failures.append(Failure(argument, "no file matches this pattern"))
        else:
            failures.append(Failure(argument, "no such file or folder"))
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return Inputs(unique, failures, skipped)


_END = object()


def map_ordered(
    work: Callable[[T], object], items: Iterable[T], *, workers: int, ahead: int
) -> Iterator[tuple[T, object]]:
    """(item, result or the exception it raised) in input order, at most `ahead` in flight."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        pending: deque[tuple[T, Future]] = deque()
        iterator = iter(items)
        while True:
            while len(pending) < max(1, ahead):
                item = next(iterator, _END)
                if item is _END:
                    break
                pending.append((item, pool.submit(work, item)))
            if not pending:
                return
            item, future = pending.popleft()
            exc = future.exception()
            yield item, exc if exc is not None else future.result()


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    *,
    batch_size: int = 16,
    workers: int = 2,
    cam: bool = False,
) -> Iterator[tuple[Path, Prediction | Failure]]:
    """Each file with its Prediction or Failure, in input order, batching the model calls."""
    window: list[tuple[Path, PreparedImage | Failure]] = []

    def flush() -> Iterator[tuple[Path, Prediction | Failure]]:
        good = [item for _, item in window if isinstance(item, PreparedImage)]
        predictions = iter(predictor.predict_batch(good, cam=cam, batch_size=batch_size))
        for path, item in window:
            yield path, next(predictions) if isinstance(item, PreparedImage) else item
        window.clear()

    prepared = map_ordered(predictor.prepare, files, workers=workers, ahead=2 * batch_size)
    good_count = 0
    for path, result in prepared:
        if isinstance(result, BaseException):
            window.append((path, Failure(str(path), failure_reason(result), error_code(result))))
        else:
            window.append((path, result))
            good_count += 1
        if good_count >= batch_size:
            yield from flush()
            good_count = 0
    yield from flush()
