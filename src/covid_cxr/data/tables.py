"""Reading publishers', users' and manifest CSVs with errors that name the file and column."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from covid_cxr.errors import DataError


def read_table(path: Path, required: Iterable[str], what: str) -> list[dict[str, str]]:
    """Rows of a CSV with a header; refuses a missing file, no header, or missing columns.

    `what` says what the file should be ("a manifest", "ieee8023 metadata") for the message.
    Values are stripped; a missing trailing cell reads as "".
    """
    required = tuple(required)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or [] if name]
            if not header:
                raise DataError(f"{path}: empty file; expected {what} with a header row")
            missing = [column for column in required if column not in header]
            if missing:
                raise DataError(
                    f"{path}: column(s) {', '.join(missing)} missing; {what} needs "
                    f"{', '.join(required)} (found: {', '.join(header)})"
                )
            return [
                {
                    (key or "").strip(): (value or "").strip()
                    for key, value in row.items()
                    if isinstance(value, str | None)
                }
                for row in reader
            ]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); is it really a CSV?") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from exc
