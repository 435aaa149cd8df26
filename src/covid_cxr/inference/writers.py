"""Output of `covid-cxr predict`: an aligned table for people, CSV or JSON lines for programs.

Every format has one row per input, predicted or failed, with the same fields; a failed row
has empty prediction fields and the reason in `error`. Rows are written as they arrive, so a
long batch can be followed (and interrupted) without losing what is done.
"""

from __future__ import annotations

import csv
import json
from typing import TYPE_CHECKING, Literal, TextIO

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

    def __init__(self, stream: TextIO, fmt: Format, *, with_cam: bool = False) -> None:
        self.stream, self.format = stream, fmt
        self.fields = (*FIELDS, "cam") if with_cam else FIELDS
        self._csv = csv.DictWriter(stream, self.fields, extrasaction="ignore", lineterminator="\n")
        self._started = False

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
