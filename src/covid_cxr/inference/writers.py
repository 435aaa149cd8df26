"""Output of `covid-cxr predict`: an aligned table for people, CSV or JSON lines for programs.

Every format has one row per input, predicted or failed, with the same fields; a failed row
has empty prediction fields and the reason in `error`. Rows are written as they arrive, so a
long batch can be followed (and interrupted) without losing what is done.

A file output (`RowFile`) never truncates an earlier result: rows go to a partial file beside
it (`.NAME.partial`, flushed row by row) that replaces the output only when the run completes.
A killed run leaves the earlier output intact and its rows in the partial file, and
`previous_rows` reads both back so that `covid-cxr predict --resume` continues where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TextIO

from covid_cxr.errors import ConfigError
from covid_cxr.fileio import atomic_open

if TYPE_CHECKING:
    from covid_cxr.inference.batch import Failure
    from covid_cxr.inference.predictor import Prediction

Format = Literal["table", "csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("table", "csv", "jsonl")
FIELDS = ("path", "probability", "label", "threshold", "model_version", "error")


def record(path: str, result: Prediction | Failure, cam_path: str | None) -> dict[str, object]:
    from covid_cxr.inference.batch import Failure

    if isinstance(result, Failure):
        row: dict[str, object] = dict.fromkeys(FIELDS)
        row.update(path=path, error=result.reason)
    else:
        row = {
            "path": path,
            "probability": round(result.probability, 6),
            "label": result.label,
            "threshold": result.threshold,
            "model_version": result.model_version,
            "error": None,
        }
    row["cam"] = cam_path
    return row


class RowWriter:
    """Writes records in one of FORMATS to `stream`; `with_cam` adds the overlay path column."""

    def __init__(
        self, stream: TextIO, fmt: Format, *, with_cam: bool = False, started: bool = False
    ) -> None:
        self.stream, self.format = stream, fmt
        self.fields = (*FIELDS, "cam") if with_cam else FIELDS
        self._csv = csv.DictWriter(stream, self.fields, extrasaction="ignore", lineterminator="\n")
        self._started = started  # True: the header is already there (a resumed file)

    def write(self, row: dict[str, object]) -> None:
        if not self._started:
            self._start()
        if self.format == "csv":
            self._csv.writerow({k: "" if row.get(k) is None else row.get(k) for k in self.fields})
        elif self.format == "jsonl":
            self.stream.write(json.dumps({k: row.get(k) for k in self.fields}) + "\n")
        else:
            self.stream.write(_table_line(row) + "\n")
        self.stream.flush()

    def _start(self) -> None:
        self._started = True
        if self.format == "csv":
            self._csv.writeheader()
        elif self.format == "table":
            self.stream.write(_table_line(None) + "\n")


def _table_line(row: dict[str, object] | None) -> str:
    # The path goes last so no column width depends on it.
    if row is None:
        return f"{'probability':>11}  {'label':<9}  {'threshold':>9}  {'model':<16}  path"
    if row["error"] is not None:
        return f"{'-':>11}  {'ERROR':<9}  {'-':>9}  {'-':<16}  {row['path']}: {row['error']}"
    line = (
        f"{row['probability']:>11.4f}  {row['label']:<9}  {row['threshold']:>9.3f}  "
        f"{row['model_version']!s:<16}  {row['path']}"
    )
    if row.get("cam"):
        line += f"  (cam: {row['cam']})"
    return line


def partial_path(output: Path) -> Path:
    """Where the rows of a run writing `output` live until it completes."""
    return output.with_name(f".{output.name}.partial")


class RowFile:
    """The stream for rows bound for `output`: the partial file, started with `kept` rows (those
    of an earlier run), renamed onto `output` when the block completes. An interrupted block
    leaves the partial file for --resume and the earlier output untouched."""

    def __init__(
        self, output: Path, fmt: Format, kept: Iterable[dict[str, object]], *, with_cam: bool
    ) -> None:
        self.output, self.partial = output, partial_path(output)
        self.format, self.with_cam, self.kept = fmt, with_cam, list(kept)
        self.stream: TextIO | None = None

    def __enter__(self) -> RowWriter:
        # The kept rows reach the disk before any older partial file is replaced.
        with atomic_open(self.partial, "w", encoding="utf-8", newline="") as handle:
            writer = RowWriter(handle, self.format, with_cam=self.with_cam)
            for row in self.kept:
                writer.write(row)
        self.stream = self.partial.open("a", encoding="utf-8", newline="")
        return RowWriter(self.stream, self.format, with_cam=self.with_cam, started=bool(self.kept))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self.stream is not None
        if kind is None:
            self.stream.flush()
            os.fsync(self.stream.fileno())
        self.stream.close()
        if kind is None:
            os.replace(self.partial, self.output)


def previous_rows(output: Path, fmt: Format) -> Iterator[dict[str, object]]:
    """The complete rows of earlier runs: the finished output, then a killed run's partial
    file (a line the kill cut short is dropped). Later rows for a path win."""
    for path in (output, partial_path(output)):
        if path.is_file():
            yield from _parse_rows(path, fmt)


def _parse_rows(path: Path, fmt: Format) -> Iterator[dict[str, object]]:
    text = path.read_text(encoding="utf-8")
    text = text[: text.rfind("\n") + 1]  # a row is complete once its newline is written
    wrong = ConfigError(
        f"{path}: cannot resume from it: not a {fmt} output of covid-cxr predict "
        f"(columns {', '.join(FIELDS)}); remove it or choose another --output"
    )
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is not None and not set(FIELDS) <= set(reader.fieldnames):
            raise wrong
        for row in reader:
            yield {key: (value if value != "" else None) for key, value in row.items()}
        return
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise wrong from None
        if not isinstance(row, dict) or not set(FIELDS) <= row.keys():
            raise wrong
        yield row
