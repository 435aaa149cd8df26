"""Batch prediction: find the images, decode them in parallel, run the model in batches.

A file that cannot be read becomes a `Failure` with its reason; it never stops the batch.
So does every entry of a folder walk that is not a readable regular file: a folder without
permission, a symbolic link loop or dangling link, a named pipe (never opened: it would block),
a socket or device. Decoding runs in a thread pool (Pillow, pydicom's codecs and numpy release
the GIL for the heavy parts; processes would only add the cost of shipping pixel arrays back) a
bounded number of images ahead of the model, so memory stays flat however many files there are.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from covid_cxr.errors import error_code, failure_reason
from covid_cxr.imaging.read import Radiograph, read_radiograph
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
    files: list[Path] = field(default_factory=list)
    # Arguments that name nothing, and walk entries that cannot be read (folders without
    # permission, link loops, dangling links, named pipes, sockets, devices).
    failures: list[Failure] = field(default_factory=list)
    skipped: int = 0  # files inside folders ignored for their extension


@dataclass(frozen=True)
class Limits:
    """What `read_radiograph` refuses before decoding: file size (stat) and header pixels."""

    max_bytes: int | None = None
    max_pixels: int | None = None

    def read(self, path: Path) -> Radiograph:
        options = {k: v for k, v in vars(self).items() if v is not None}
        return read_radiograph(path, **options)


def _stat(path: Path) -> os.stat_result | Failure:
    """The stat of what `path` points to, or why it cannot be used."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return Failure(str(path), "dangling symbolic link (its target does not exist)")
        return Failure(str(path), "no such file or folder")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Failure(str(path), "symbolic link loop")
        return Failure(str(path), f"cannot be read ({exc.strerror or exc})")


def _special(path: Path, info: os.stat_result) -> Failure:
    kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a socket or device"
    return Failure(str(path), f"not a regular file ({kind}); skipped without opening it")


def _walk(folder: Path, inputs: Inputs, visited: set[tuple[int, int]]) -> None:
    """Files under `folder` (following links to folders, each folder once), into `inputs`."""
    try:
        with os.scandir(folder) as scan:
            names = sorted(entry.name for entry in scan)
    except OSError as exc:
        inputs.failures.append(
            Failure(str(folder), f"folder cannot be read ({exc.strerror or exc})")
        )
        return
    for name in names:
        if name.startswith("."):
            continue
        path = folder / name
        info = _stat(path)
        if isinstance(info, Failure):
            inputs.failures.append(info)
        elif stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in visited:
                inputs.failures.append(
                    Failure(str(path), "symbolic link loop (a folder already walked)")
                )
                continue
            visited.add((info.st_dev, info.st_ino))
            _walk(path, inputs, visited)
        elif not stat.S_ISREG(info.st_mode):
            inputs.failures.append(_special(path, info))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            inputs.files.append(path)
        else:
            inputs.skipped += 1


def _add(path: Path, inputs: Inputs) -> None:
    """One named path (an argument or a glob match): a file, a folder to walk, or a Failure."""
    info = _stat(path)
    if isinstance(info, Failure):
        inputs.failures.append(info)
    elif stat.S_ISDIR(info.st_mode):
        found = Inputs()
        _walk(path, found, {(info.st_dev, info.st_ino)})
        inputs.files += sorted(found.files)
        inputs.failures += found.failures
        inputs.skipped += found.skipped
    elif stat.S_ISREG(info.st_mode):
        inputs.files.append(path)
    else:
        inputs.failures.append(_special(path, info))


def gather(arguments: Sequence[str]) -> Inputs:
    """Expand files, folders (recursively) and globs into a de-duplicated list of files."""
    inputs = Inputs()
    for argument in arguments:
        path = Path(argument)
        if os.path.lexists(path) or not _GLOB_CHARS & set(argument):
            _add(path, inputs)
            continue
        matches = sorted(Path(m) for m in glob.glob(argument, recursive=True))
        if not matches:
            inputs.failures.append(Failure(argument, "no file matches this pattern"))
        for match in matches:
            _add(match, inputs)
    inputs.files = list(dict.fromkeys(p.resolve() for p in inputs.files))
    return inputs


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
    limits: Limits | None = None,
) -> Iterator[tuple[Path, Prediction | Failure]]:
    """Each file with its Prediction or Failure, in input order, batching the model calls.

    `limits` (default: read_radiograph's own) bound what one file may cost before decoding."""
    window: list[tuple[Path, PreparedImage | Failure]] = []

    def flush() -> Iterator[tuple[Path, Prediction | Failure]]:
        good = [item for _, item in window if isinstance(item, PreparedImage)]
        predictions = iter(predictor.predict_batch(good, cam=cam, batch_size=batch_size))
        for path, item in window:
            yield path, next(predictions) if isinstance(item, PreparedImage) else item
        window.clear()

    limits = limits or Limits()

    def prepare(path: Path) -> PreparedImage:
        start = time.perf_counter()
        radiograph = limits.read(path)
        read_ms = (time.perf_counter() - start) * 1000.0
        return dataclasses.replace(predictor.prepare(radiograph), read_ms=read_ms)

    prepared = map_ordered(prepare, files, workers=workers, ahead=2 * batch_size)
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
