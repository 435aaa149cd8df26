"""`covid-cxr predict` records every input in the audit trail; `covid-cxr audit export|stats`
read it back; nothing identifying is stored; a kill -9 loses no reported prediction."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit_helpers import fresh_database, postgres_server, sha256_of, stored_bytes
from covid_cxr.audit.capture import file_digest
from covid_cxr.audit.store import open_store
from covid_cxr.cli import main
from imaging_helpers import make_dicom, truncated
from inference_helpers import real_radiographs

PATIENT_NAME = "Quixote^Alonso^Audit"
PATIENT_ID = "PID-AUDIT-55813"
DICOM_NAME = "alonso-quixote-chest.dcm"


@pytest.fixture(scope="module")
def scans(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real PNG and JPEG radiographs, a DICOM made from a real one with patient attributes,
    a truncated JPEG and a text file posing as a PNG."""
    real = real_radiographs(datasets)
    root = tmp_path_factory.mktemp("audit-scans")
    for path in real["png"][:2] + real["jpeg"][:2]:
        shutil.copy(path, root / path.name)
    pixels = np.asarray(Image.open(real["png"][3]).convert("L"))
    dicom = make_dicom(
        pixels, PatientName=PATIENT_NAME, PatientID=PATIENT_ID, PatientBirthDate="19470923"
    )
    (root / DICOM_NAME).write_bytes(dicom)
    (root / "broken-upload.jpg").write_bytes(truncated(real["jpeg"][3].read_bytes()))
    (root / "notes.png").write_text(f"Notes about {PATIENT_NAME}, not an image.\n")
    return root


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def _export(url: str, *options: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "covid_cxr.cli", "audit", "export", "--audit-db", url,
         "--format", "jsonl", *options],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_predict_records_one_event_per_input_and_nothing_identifying(
    scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    missing = str(tmp_path / "missing-scan.png")
    code = main(["predict", str(scans), missing, "--format", "jsonl", "--audit-db", str(db)])
    assert code == 1  # two broken files and a missing one
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with open_store(str(db), create=False) as store:
        events = list(store.events())
    assert len(events) == len(rows) == 8
    by_hash = {e.input_sha256: e for e in events}
    for row in rows:
        if row["path"] == missing:
            continue
        path = Path(row["path"])
        audited = by_hash[sha256_of(path)]
        assert audited.channel == "cli" and audited.who is None
        assert audited.input_bytes == path.stat().st_size
        if row["error"] is None:
            assert audited.outcome == "predicted" and audited.reason is None
            assert audited.probability == pytest.approx(row["probability"], abs=1e-6)
            assert (audited.label, audited.threshold) == (row["label"], row["threshold"])
            assert audited.model_version == row["model_version"]
            assert audited.latency_ms is not None and audited.latency_ms > 0
        else:
            assert audited.outcome == "failed" and audited.probability is None
    assert by_hash[sha256_of(scans / DICOM_NAME)].input_format == "DICOM"
    assert by_hash[sha256_of(scans / "broken-upload.jpg")].reason == "corrupt_image"
    assert by_hash[sha256_of(scans / "notes.png")].reason == "not_an_image"
    gone = [e for e in events if e.input_sha256 is None]
    assert len(gone) == 1 and gone[0].reason == "unreadable_file"
    assert len({e.request_id for e in events}) == 8

    # Neither the database file (nor any WAL left beside it) holds a name or a patient value.
    stored = stored_bytes(f"sqlite:///{db}")
    assert sha256_of(scans / DICOM_NAME).encode() in stored
    for secret in ("Quixote", "Alonso", PATIENT_ID, "19470923", "alonso-quixote", "broken-upload",
                   "notes", "missing-scan", str(scans), str(tmp_path)):  # fmt: skip
        assert secret.encode() not in stored, secret
    with sqlite3.connect(db) as con:
        dump = "\n".join(con.iterdump())
    assert "Quixote" not in dump and "alonso" not in dump.lower() and "notes" not in dump


def test_an_input_the_gate_refuses_is_recorded_as_refused(
    scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real radiograph in a DICOM that says it is a lateral view: the gate refuses it."""
    pixels = np.asarray(Image.open(next(scans.glob("*.png"))).convert("L"))
    lateral = tmp_path / "lateral.dcm"
    lateral.write_bytes(make_dicom(pixels, ViewPosition="LL", PatientName=PATIENT_NAME))
    db = tmp_path / "audit.db"
    assert main(["predict", str(lateral), "--format", "csv", "--audit-db", str(db)]) == 1
    assert "out of scope" in capsys.readouterr().err
    with open_store(str(db), create=False) as store:
        (event,) = store.events()
    assert (event.outcome, event.reason, event.input_format) == ("refused", "out_of_scope", "DICOM")
    assert event.input_sha256 == sha256_of(lateral) and event.probability is None


def test_a_named_pipe_is_recorded_without_blocking(
    scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hashing for the trail never opens a pipe for a blocking read (it would hang forever)."""
    pipe = tmp_path / "scan.png"
    os.mkfifo(pipe)
    db = tmp_path / "audit.db"
    assert file_digest(pipe) == (None, 0, None)
    assert file_digest(tmp_path) == (None, 0, None)  # a folder
    assert file_digest(tmp_path / "gone.png") == (None, 0, None)
    png = next(scans.glob("*.png"))
    assert file_digest(png) == (sha256_of(png), png.stat().st_size, "PNG")
    assert main(["predict", str(pipe), str(png), "--format", "csv", "--audit-db", str(db)]) == 1
    capsys.readouterr()
    with open_store(str(db), create=False) as store:
        events = list(store.events())
    assert [(e.outcome, e.input_sha256) for e in events] == [
        ("failed", None),
        ("predicted", sha256_of(png)),
    ]


def test_no_audit_records_nothing_and_the_default_trail_is_in_the_state_folder(
    scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("COVID_CXR_AUDIT_DB", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    one = str(next(scans.glob("*.png")))
    assert main(["predict", one, "--no-audit"]) == 0
    assert not (tmp_path / "state").exists()
    assert main(["predict", one, "--audit-db", "off"]) == 0
    assert not (tmp_path / "state").exists()
    assert main(["predict", one, one]) == 0  # the same file twice is one input
    capsys.readouterr()
    trail = tmp_path / "state" / "covid-cxr" / "audit.db"
    with open_store(str(trail), create=False) as store:
        assert [e.input_sha256 for e in store.events()] == [sha256_of(Path(one))]


def test_an_unusable_trail_stops_predict_before_any_row(
    scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "rows.csv"
    url = f"sqlite:///{blocker / 'audit.db'}"
    assert main(["predict", str(scans), "--output", str(out), "--audit-db", url]) == 2
    err = capsys.readouterr().err
    assert "cannot open the audit trail" in err and "--no-audit" in err
    assert not out.exists()


def test_export_csv_jsonl_since_and_stats(
    scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    assert main(["predict", str(scans), "--format", "csv", "--audit-db", url]) == 1
    capsys.readouterr()
    out = tmp_path / "export" / "trail.csv"
    assert main(["audit", "export", "--audit-db", url, "--output", str(out)]) == 0
    assert "7 event(s) exported" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 7 and list(rows[0])[:3] == ["time", "request_id", "channel"]
    assert sorted(r["outcome"] for r in rows) == ["failed"] * 2 + ["predicted"] * 5
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert all(r["who"] == "" for r in rows)  # None is an empty cell

    cut = rows[3]["time"]
    later = _export(url, "--since", cut)
    assert [e["request_id"] for e in later] == [r["request_id"] for r in rows[3:]]
    assert later[0]["probability"] is None or isinstance(later[0]["probability"], float)
    assert _export(url, "--since", "2999-01-01") == []

    assert main(["audit", "stats", "--audit-db", url, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["total"] == 7
    assert stats["by_outcome"] == {"predicted": 5, "failed": 2}
    assert stats["by_channel"] == {"cli": 7}
    assert list(stats["by_model"].values()) == [7]
    assert 0 < stats["latency_p50_ms"] <= stats["latency_p95_ms"]
    assert (stats["first"], stats["last"]) == (rows[0]["time"], rows[-1]["time"])
    assert main(["audit", "stats", "--audit-db", url]) == 0
    text = capsys.readouterr().out
    assert "events: 7" in text and "predicted" in text and "latency: p50" in text


def test_export_of_a_missing_trail_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "export", "--audit-db", str(tmp_path / "nothing.db")]) == 2
    assert "no audit trail there" in capsys.readouterr().err
    assert main(["audit", "stats", "--audit-db", "ftp://x/y"]) == 2
    assert "unknown address" in capsys.readouterr().err
    assert main(["audit", "export", "--since", "last week", "--audit-db", "x.db"]) == 2


def _kill_mid_batch(url: str, folder: Path, rows_before_kill: int) -> list[dict[str, object]]:
    """Run `covid-cxr predict` streaming JSON lines; kill -9 it once some rows are out.

    Returns every row it wrote before it died."""
    process = subprocess.Popen(
        [sys.executable, "-m", "covid_cxr.cli", "predict", str(folder), "--format", "jsonl",
         "--batch-size", "2", "--workers", "1", "--audit-db", url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    rows = []
    for line in process.stdout:
        rows.append(json.loads(line))
        if len(rows) == rows_before_kill:
            process.send_signal(signal.SIGKILL)
            break
    rows += [json.loads(line) for line in process.stdout if line.strip()]
    assert process.wait(timeout=60) == -signal.SIGKILL
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_row_written_before_a_kill_9_is_in_the_trail(
    backend: str, datasets: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    real = real_radiographs(datasets)
    folder = tmp_path / "batch"
    folder.mkdir()
    files = real["png"] + real["jpeg"]
    for path in files:
        shutil.copy(path, folder / path.name)
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        url = fresh_database(request.getfixturevalue("postgres"))
    rows = _kill_mid_batch(url, folder, rows_before_kill=7)
    assert 7 <= len(rows) < len(files), "the kill must land mid-batch to prove anything"
    audited = {e["input_sha256"]: e for e in _export(url)}
    for row in rows:
        event = audited[sha256_of(Path(str(row["path"])))]
        assert event["probability"] == pytest.approx(row["probability"], abs=1e-6)
