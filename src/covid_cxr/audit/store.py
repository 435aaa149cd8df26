"""Where audit events live: a local SQLite file (the default) or a shared PostgreSQL database.

`record` commits one event per transaction and returns only after the commit, so an event
whose prediction was returned survives a kill -9 of the process: SQLite in WAL mode with
synchronous=NORMAL has the committed transaction in the WAL file (the operating system's
cache survives a process kill; a power cut may lose the last transactions, which FULL would
not), and a PostgreSQL commit is on the server. Both stores are safe to share between
threads: SQLite writes under one lock (a commit takes microseconds), PostgreSQL gives every
thread its own connection so that several predictions can commit at once. Several processes
or machines may write to one PostgreSQL database; several processes on one machine to one
SQLite file.

Addresses: `sqlite:///relative/path.db`, `sqlite:////absolute/path.db` (as SQLAlchemy spells
them), a plain file path, `postgresql://user@host/db` (needs `pip install 'covid-cxr[postgres]'`),
or `off` for no trail at all.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from covid_cxr.audit.events import CHANNELS, OUTCOMES, NullRecorder, PredictionEvent
from covid_cxr.errors import CovidCxrError

AUDIT_DB_ENV = "COVID_CXR_AUDIT_DB"
OFF = "off"
FIELDS = tuple(f.name for f in dataclasses.fields(PredictionEvent))
TABLE = "prediction_events"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id {id},
    time {time} NOT NULL,
    request_id TEXT NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ({channels})),
    who TEXT,
    input_sha256 TEXT,
    input_format TEXT,
    input_bytes BIGINT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ({outcomes})),
    reason TEXT,
    probability DOUBLE PRECISION,
    threshold DOUBLE PRECISION,
    label TEXT,
    latency_ms DOUBLE PRECISION
)
"""


def _schema(id_type: str, time_type: str) -> list[str]:
    def quoted(words: tuple[str, ...]) -> str:
        return ", ".join(f"'{word}'" for word in words)

    table = _SCHEMA.format(
        table=TABLE,
        id=id_type,
        time=time_type,
        channels=quoted(CHANNELS),
        outcomes=quoted(OUTCOMES),
    )
    return [table, f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE} (time)"]


class AuditError(CovidCxrError):
    """The audit trail cannot be opened, written or read; no prediction is reported then."""


def state_dir() -> Path:
    """The user's state folder for covid-cxr ($XDG_STATE_HOME, else ~/.local/state)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "covid-cxr"


def default_url() -> str:
    """$COVID_CXR_AUDIT_DB, else the SQLite file audit.db in the user's state folder."""
    return os.environ.get(AUDIT_DB_ENV) or f"sqlite:///{state_dir() / 'audit.db'}"


def redact(url: str) -> str:
    """The address with any password (user:PASSWORD@ or ?password=) replaced, for messages."""
    url = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite address (`sqlite:///x.db`, a plain path), else None."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if "://" in url or url.strip().lower() == OFF:
        return None
    return Path(url)


def to_utc(value: str | datetime) -> datetime:
    """An ISO 8601 time (or datetime) in UTC; a time without a zone is taken as UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise AuditError(
                f"{value!r} is not an ISO 8601 time (e.g. 2026-12-01 or 2026-12-01T14:30:00Z)"
            ) from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return to_utc(value).isoformat(timespec="microseconds")


def _check(event: PredictionEvent) -> None:
    if event.input_sha256 is not None and not _SHA256.fullmatch(event.input_sha256):
        raise AuditError(
            f"input_sha256 must be 64 lowercase hex digits, got {event.input_sha256!r}"
        )
    if event.outcome not in OUTCOMES or event.channel not in CHANNELS:
        raise AuditError(f"unknown outcome {event.outcome!r} or channel {event.channel!r}")


class AuditStore:
    """The common part of both stores: one table, one row per event, read back in time order."""

    kind: Literal["sqlite", "postgresql"]
    placeholder: str

    def __init__(self, shown: str) -> None:
        self.shown = shown

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown!r})"

    def _insert_sql(self) -> str:
        marks = ", ".join([self.placeholder] * len(FIELDS))
        return f"INSERT INTO {TABLE} ({', '.join(FIELDS)}) VALUES ({marks})"

    def _select_sql(self, since: datetime | None) -> str:
        where = f" WHERE time >= {self.placeholder}" if since is not None else ""
        return f"SELECT {', '.join(FIELDS)} FROM {TABLE}{where} ORDER BY time, id"

    def _row(self, event: PredictionEvent) -> tuple[Any, ...]:
        _check(event)
        values = dataclasses.astuple(event)
        return (self._time_value(to_utc(event.time)), *values[1:])

    def _event(self, row: tuple[Any, ...]) -> PredictionEvent:
        return PredictionEvent(_iso(to_utc(row[0])), *row[1:])

    def _time_value(self, value: datetime) -> Any:
        return value

    def record(self, event: PredictionEvent) -> None:
        raise NotImplementedError

    def events(self, since: str | datetime | None = None) -> Iterator[PredictionEvent]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqliteStore(AuditStore):
    """A SQLite file in WAL mode: readers (an export) never block the writers."""

    kind = "sqlite"
    placeholder = "?"

    def __init__(self, path: Path, *, create: bool = True) -> None:
        super().__init__(f"sqlite:///{path}")
        self.path = path
        if not create and not path.is_file():
            raise AuditError(
                f"{path}: no audit trail there (nothing has been recorded with "
                f"--audit-db {self.shown}); check the address"
            )
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _schema("INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT"):
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise AuditError(
                f"{path}: cannot open the audit trail ({exc}); give a writable "
                "--audit-db sqlite:///PATH, or turn the trail off with --no-audit"
            ) from exc

    def _time_value(self, value: datetime) -> Any:
        return _iso(value)  # ISO text in UTC at a fixed width sorts as time does

    def record(self, event: PredictionEvent) -> None:
        row = self._row(event)
        try:
            with self._lock:
                self._db.execute(self._insert_sql(), row)  # autocommit: one transaction
        except sqlite3.Error as exc:
            raise AuditError(f"{self.path}: cannot record the audit event ({exc})") from exc

    def events(self, since: str | datetime | None = None) -> Iterator[PredictionEvent]:
        since = None if since is None else to_utc(since)
        params = () if since is None else (_iso(since),)
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
        reader = sqlite3.connect(uri, uri=True, timeout=30.0)
        try:
            for row in reader.execute(self._select_sql(since), params):
                yield self._event(row)
        except sqlite3.Error as exc:
            raise AuditError(f"{self.path}: cannot read the audit trail ({exc})") from exc
        finally:
            reader.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStore(AuditStore):
    """A PostgreSQL table shared by any number of servers; one connection per thread."""

    kind = "postgresql"
    placeholder = "%s"

    def __init__(self, url: str, *, create: bool = True) -> None:
        super().__init__(redact(url))
        try:
            import psycopg
        except ImportError as exc:
            raise AuditError(
                f"--audit-db {self.shown} needs the PostgreSQL driver: "
                "pip install 'covid-cxr[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        if create:
            self._create_table()

    def _create_table(self) -> None:
        with self._errors("create the audit table in"):
            db = self._connection()
            with db.transaction():
                # Servers starting together must not race to create the same table.
                db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
                for statement in _schema(
                    "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "TIMESTAMPTZ"
                ):
                    db.execute(statement)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except self._psycopg.Error as exc:
            raise AuditError(f"cannot {doing} {self.shown}: {exc}".strip()) from exc

    def _connection(self) -> Any:
        db = getattr(self._local, "db", None)
        if db is None or db.closed:
            db = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def record(self, event: PredictionEvent) -> None:
        row = self._row(event)
        with self._errors("record the audit event in"):
            try:
                self._connection().execute(self._insert_sql(), row)  # autocommit: committed
            except self._psycopg.OperationalError:
                # The server restarted or dropped the connection: one fresh try.
                self._local.db = None
                self._connection().execute(self._insert_sql(), row)

    def events(self, since: str | datetime | None = None) -> Iterator[PredictionEvent]:
        since = None if since is None else to_utc(since)
        params = () if since is None else (since,)
        with (
            self._errors("read the audit trail in"),
            self._psycopg.connect(self.url, connect_timeout=10) as db,
            db.cursor(name="audit_export") as cursor,  # server-side: streams the rows
        ):
            cursor.execute(self._select_sql(since), params)
            for row in cursor:
                yield self._event(row)

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()


def open_store(url: str | None = None, *, create: bool = True) -> AuditStore:
    """The store at `url` (default: `default_url()`); `create=False` to read an existing one."""
    url = url or default_url()
    if url.startswith(_POSTGRES_SCHEMES):
        return PostgresStore(url, create=create)
    path = sqlite_path(url)
    if path is None:
        raise AuditError(
            f"--audit-db {redact(url)}: unknown address; use sqlite:///PATH, a file path, "
            "postgresql://USER@HOST/DB, or off"
        )
    return SqliteStore(path.expanduser(), create=create)


def describe(url: str | None) -> str:
    """Where `recorder_for(url)` records, for messages: the address without its password."""
    if url is not None and url.strip().lower() == OFF:
        return OFF
    return redact(url or default_url())


def recorder_for(url: str | None = None) -> AuditStore | NullRecorder:
    """What `covid-cxr predict` and `serve` record into: `off` gives a NullRecorder."""
    if url is not None and url.strip().lower() == OFF:
        return NullRecorder()
    return open_store(url)
