"""Watch a PACS: every new study with radiographs is processed exactly once, across restarts.

What has been done lives in a small SQLite file (`--state`), written after a study's results
are stored. A crash between storing and writing is covered by `has_results`: the study then
already holds its covid-cxr series and is only marked done. While the PACS is down the watcher
waits with exponential backoff (up to a minute between tries) and carries on when it is back;
no study is marked done before its results are stored.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr.pacs.dicomweb import DicomWebClient, PacsUnavailable
from covid_cxr.pacs.roundtrip import RADIOGRAPH_MODALITIES, StudyResult, process_study

if TYPE_CHECKING:
    from covid_cxr.audit.events import Recorder
    from covid_cxr.inference.predictor import Predictor

log = logging.getLogger("covid_cxr.pacs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    finished_at TEXT NOT NULL,
    predicted INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    note TEXT
)
"""


class ProcessedStudies:
    """The watcher's memory: which studies are done (SQLite, one row per study)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One watcher thread uses it at a time (it may be created in another thread).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)

    def done(self, study_uid: str) -> bool:
        row = self._db.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,))
        return row.fetchone() is not None

    def mark(self, result: StudyResult) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?)",
            (
                result.study_uid,
                datetime.now(UTC).isoformat(timespec="seconds"),
                result.predicted,
                result.stored,
                result.skipped,
            ),
        )

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM studies").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def pending_studies(client: DicomWebClient, memory: ProcessedStudies) -> list[str]:
    """Studies with CR or DX images that the watcher has not finished yet."""
    studies = client.search_studies(includefield="ModalitiesInStudy")
    pending = []
    for study in studies:
        modalities = study.get("ModalitiesInStudy", [])
        modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        uid = str(study.get("StudyInstanceUID", ""))
        if uid and set(modalities) & set(RADIOGRAPH_MODALITIES) and not memory.done(uid):
            pending.append(uid)
    return pending


def run_once(
    client: DicomWebClient,
    predictor: Predictor,
    memory: ProcessedStudies,
    report: Callable[[StudyResult], None],
    recorder: Recorder | None = None,
) -> int:
    """Process every pending study; returns how many were finished."""
    finished = 0
    for study_uid in pending_studies(client, memory):
        result = process_study(client, predictor, study_uid, recorder)
        memory.mark(result)
        report(result)
        finished += 1
    return finished


def watch(
    client: DicomWebClient,
    predictor: Predictor,
    memory: ProcessedStudies,
    report: Callable[[StudyResult], None],
    *,
    interval: float = 10.0,
    stop: threading.Event | None = None,
    max_wait: float = 60.0,
    recorder: Recorder | None = None,
) -> None:
    """Poll every `interval` seconds until `stop` is set; survive the PACS being down."""
    stop = stop or threading.Event()
    wait = interval
    while not stop.is_set():
        try:
            run_once(client, predictor, memory, report, recorder)
            wait = interval
        except PacsUnavailable as exc:
            wait = min(max(wait * 2, interval), max_wait)
            log.warning("%s; trying again in %.0f s", exc, wait)
        stop.wait(wait)
