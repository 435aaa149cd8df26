"""The audit store on SQLite and on a real PostgreSQL server: round trip, order, --since,
concurrency, refusals, and where the default trail lives."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit_helpers import free_port, fresh_database, postgres_server
from covid_cxr.audit.events import NullRecorder, PredictionEvent
from covid_cxr.audit.store import (
    AuditError,
    AuditStore,
    default_url,
    open_store,
    recorder_for,
    redact,
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trail' / 'audit.db'}"
    return fresh_database(request.getfixturevalue("postgres"))


def event(n: int, **changes: object) -> PredictionEvent:
    base = PredictionEvent(
        time=f"2026-12-01T10:{n // 60:02d}:{n % 60:02d}.250000+00:00",
        request_id=f"req-{n}",
        channel="api",
        who="key-a1",
        input_sha256=hashlib.sha256(str(n).encode()).hexdigest(),
        input_format="PNG",
        input_bytes=1000 + n,
        model_name="efficientnet-lite0",
        model_version="v1",
        outcome="predicted",
        probability=n / 100,
        threshold=0.1,
        label="COVID-19" if n / 100 >= 0.1 else "non-COVID",
        latency_ms=10.0 + n,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field_in_time_order(audit_url: str) -> None:
    events = [
        event(3),
        event(1, channel="cli", who=None),
        event(
            2,
            outcome="failed",
            reason="corrupt_image",
            input_format=None,
            probability=None,
            threshold=None,
            label=None,
            latency_ms=None,
        ),
        event(4, outcome="refused", reason="out_of_scope", probability=None, label=None),
        event(5, outcome="failed", reason="not_found", input_sha256=None, input_bytes=0),
    ]
    with open_store(audit_url) as store:
        for e in events:
            store.record(e)
        got = list(store.events())
    assert got == sorted(events, key=lambda e: e.time)
    assert isinstance(got[0].input_bytes, int) and isinstance(got[0].probability, float)


def test_times_are_stored_in_utc_and_since_filters_on_them(audit_url: str) -> None:
    with open_store(audit_url) as store:
        store.record(event(1, time="2026-12-01T11:00:00+01:00"))  # 10:00 UTC
        store.record(event(2, time="2026-12-01T10:30:00"))  # no zone: UTC
        store.record(event(3, time="2026-12-02T00:00:00Z"))
        assert [e.time for e in store.events()] == [
            "2026-12-01T10:00:00.000000+00:00",
            "2026-12-01T10:30:00.000000+00:00",
            "2026-12-02T00:00:00.000000+00:00",
        ]
        assert [e.request_id for e in store.events("2026-12-01T10:30:00Z")] == ["req-2", "req-3"]
        assert [e.request_id for e in store.events("2026-12-01T12:30:00+02:00")] == [
            "req-2",
            "req-3",
        ]
        assert [e.request_id for e in store.events("2026-12-02")] == ["req-3"]
        with pytest.raises(AuditError, match="not an ISO 8601 time"):
            list(store.events("yesterday"))


def test_concurrent_threads_record_every_event(audit_url: str) -> None:
    threads, per_thread = 8, 25
    with open_store(audit_url) as store:

        def work(t: int) -> None:
            for i in range(per_thread):
                store.record(event(t * per_thread + i, request_id=f"t{t}-{i}"))

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        ids = [e.request_id for e in store.events()]
    assert sorted(ids) == sorted(f"t{t}-{i}" for t in range(threads) for i in range(per_thread))


def test_records_from_one_store_are_visible_to_a_second_one(audit_url: str) -> None:
    """Several servers (or the CLI beside a server) write to one trail."""
    with open_store(audit_url) as first, open_store(audit_url) as second:
        first.record(event(1))
        second.record(event(2))
        assert [e.request_id for e in first.events()] == ["req-1", "req-2"]


def test_malformed_events_are_refused(audit_url: str) -> None:
    with open_store(audit_url) as store:
        with pytest.raises(AuditError, match="64 lowercase hex"):
            store.record(event(1, input_sha256="photo.png"))
        with pytest.raises(AuditError, match="unknown outcome"):
            store.record(event(1, outcome="maybe"))
        assert list(store.events()) == []


def test_sqlite_is_in_wal_mode_and_files_stay_private(tmp_path: Path) -> None:
    path = tmp_path / "state #1?" / "covid-cxr" / "audit.db"  # odd characters in the path
    with open_store(str(path)) as store:  # a plain path is a SQLite file
        store.record(event(1))
        assert store.kind == "sqlite"
        assert [e.request_id for e in store.events()] == ["req-1"]
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_default_trail_is_in_the_users_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COVID_CXR_AUDIT_DB", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_url() == f"sqlite:///{tmp_path / 'xdg' / 'covid-cxr' / 'audit.db'}"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home/.local/state/covid-cxr/audit.db'}"
    monkeypatch.setenv("COVID_CXR_AUDIT_DB", "postgresql://audit@db.example/trail")
    assert default_url() == "postgresql://audit@db.example/trail"


def test_off_records_nothing_and_bad_addresses_are_explained(tmp_path: Path) -> None:
    assert isinstance(recorder_for("off"), NullRecorder)
    assert isinstance(recorder_for(f"sqlite:///{tmp_path / 'a.db'}"), AuditStore)
    with pytest.raises(AuditError, match="unknown address; use sqlite:///PATH"):
        open_store("mysql://root:secret@localhost/audit")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditError, match=r"cannot open the audit trail .*--no-audit"):
        open_store(f"sqlite:///{blocker / 'audit.db'}")
    with pytest.raises(AuditError, match="no audit trail there"):
        open_store(str(tmp_path / "never-written.db"), create=False)


def test_unreachable_postgresql_is_an_audit_error_without_the_password() -> None:
    url = f"postgresql://audit:s3cret-pw@127.0.0.1:{free_port()}/trail?connect_timeout=2"
    assert redact(url) == url.replace("s3cret-pw", "***")
    assert redact("postgresql:///trail?host=/run&password=pw9&user=a") == (
        "postgresql:///trail?host=/run&password=***&user=a"
    )
    with pytest.raises(AuditError) as info:
        open_store(url)
    assert "s3cret-pw" not in str(info.value)
    assert "cannot create the audit table in postgresql://audit:***@127.0.0.1" in str(info.value)


def test_postgresql_without_its_driver_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(AuditError, match=r"pip install 'covid-cxr\[postgres\]'"):
        open_store("postgresql://audit@localhost/trail")
