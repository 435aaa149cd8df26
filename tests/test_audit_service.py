"""A real `covid-cxr serve` records every prediction in its audit trail before answering: a
kill -9 right after the last answer loses none of them, on SQLite and on PostgreSQL; the
trail holds no upload file name and no DICOM patient attribute."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from audit_helpers import fresh_database, postgres_server, sha256_of, stored_bytes
from covid_cxr.cli import main
from covid_cxr.paths import DEFAULT_MODEL
from covid_cxr.service.settings import ServiceSettings
from covid_cxr.service.trail import key_id
from imaging_helpers import make_dicom
from inference_helpers import real_radiographs
from server_launcher import RunningServer, start_server
from service_helpers import asgi_client, make_app

API_KEY = "audit-test-key-0123"
PATIENT_NAME = "Quixote^Alonso^Audit"
PATIENT_ID = "PID-AUDIT-55813"
UPLOAD_NAME = "alonso-quixote-chest.dcm"


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def _trail(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return fresh_database(request.getfixturevalue("postgres"))


def _serve(url: str, tmp_path: Path, processes: int = 1) -> RunningServer:
    args = ["--audit-db", url, "--inference-workers", "2", "--threads", "1"]
    args += ["--workers", str(processes)]
    return start_server(args, tmp_path / "server.log", env={"COVID_CXR_API_KEY": API_KEY})


def _kill_9(server: RunningServer) -> None:
    """kill -9 the server and every worker process it started, at once."""
    processes = [psutil.Process(server.process.pid)]
    processes += processes[0].children(recursive=True)
    for process in processes:
        process.send_signal(signal.SIGKILL)
    assert server.process.wait(timeout=30) == -signal.SIGKILL


def _export(url: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "covid_cxr.cli", "audit", "export", "--audit-db", url,
         "--format", "jsonl"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "processes"), [("sqlite", 1), ("postgresql", 1), ("sqlite", 2)]
)
def test_kill_9_right_after_the_last_answer_loses_no_prediction(
    backend: str, processes: int, datasets: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """20 answers from 4 concurrent clients, then kill -9: all 20 are in the trail (with two
    server processes, both write into the one SQLite file)."""
    real = real_radiographs(datasets)
    files = real["png"][:10] + real["jpeg"][:10]
    url = _trail(backend, tmp_path, request)
    server = _serve(url, tmp_path, processes)
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:

            def send(path: Path) -> tuple[str, str, float]:
                for _ in range(120):  # /readyz said one process is ready; the other may load
                    r = c.post("/api/v1/predict", files={"file": (path.name, path.read_bytes())})
                    if r.status_code != 503 or r.json()["error"]["code"] != "not_ready":
                        break
                    time.sleep(0.5)
                assert r.status_code == 200, r.text
                return r.headers["x-request-id"], sha256_of(path), r.json()["probability"]

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(send, files))
        _kill_9(server)  # right after the last answer arrived
    finally:
        if server.process.poll() is None:
            server.stop()
    events = {e["request_id"]: e for e in _export(url)}
    assert len(events) == len(answers) == 20
    for request_id, sha256, probability in answers:
        event = events[request_id]
        assert (event["channel"], event["outcome"]) == ("api", "predicted")
        assert event["who"] == key_id(API_KEY) and API_KEY not in json.dumps(event)
        assert event["input_sha256"] == sha256
        assert event["probability"] == pytest.approx(probability, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_trail_holds_no_upload_name_and_no_patient_attribute(
    backend: str, datasets: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pixels = np.asarray(Image.open(real_radiographs(datasets)["png"][0]).convert("L"))
    dicom = make_dicom(
        pixels, PatientName=PATIENT_NAME, PatientID=PATIENT_ID, PatientBirthDate="19470923"
    )
    url = _trail(backend, tmp_path, request)
    server = _serve(url, tmp_path)
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
            ok = c.post("/api/v1/predict", files={"file": (UPLOAD_NAME, dicom)})
            bad = c.post("/api/v1/predict", files={"file": ("quixote-notes.png", b"notes")})
        assert (ok.status_code, bad.status_code) == (200, 415)
    finally:
        server.stop()
    events = _export(url)
    assert [(e["outcome"], e["input_format"]) for e in events] == [
        ("predicted", "DICOM"),
        ("failed", None),
    ]
    assert events[1]["reason"] == "not_an_image"
    assert PATIENT_NAME.encode() in dicom  # the secrets were there to leak
    on_disk = stored_bytes(url)
    assert str(events[0]["input_sha256"]).encode() in on_disk  # the check reads the real files
    stored = json.dumps(events).encode() + on_disk
    for secret in ("Quixote", "Alonso", PATIENT_ID, "19470923", "alonso-quixote", "notes"):
        assert secret.encode() not in stored, secret


@pytest.mark.slow
def test_a_prediction_that_cannot_be_recorded_is_withheld(datasets: Path, tmp_path: Path) -> None:
    """The PostgreSQL server goes away under a running covid-cxr server: the next answer is a
    503 `audit_unavailable`, not an unrecorded prediction."""
    files = {"file": ("x.png", real_radiographs(datasets)["png"][0].read_bytes())}
    with postgres_server() as server_url:
        url = fresh_database(server_url)
        server = _serve(url, tmp_path)
        client = httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60)
        assert client.post("/api/v1/predict", files=files).status_code == 200
        assert len(_export(url)) == 1
    try:  # PostgreSQL is stopped now
        answer = client.post("/api/v1/predict", files=files)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "audit_unavailable"
        assert "probability" not in answer.text
    finally:
        client.close()
        server.stop()
    assert "audit trail unavailable" in server.log_text()


def test_serve_refuses_to_start_without_a_writable_trail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["serve", "--audit-db", f"sqlite:///{blocker / 'audit.db'}"]) == 2
    assert "cannot open the audit trail" in capsys.readouterr().err


def test_covid_cxr_audit_db_in_the_environment_names_the_servers_trail(
    datasets: Path, tmp_path: Path
) -> None:
    """COVID_CXR_AUDIT_DB reaches the app through the settings (as in each worker process)."""
    from covid_cxr.service.engine import Engine

    db = tmp_path / "from-env.db"
    settings = ServiceSettings.from_env({"COVID_CXR_AUDIT_DB": f"sqlite:///{db}"})
    assert settings.audit_db == f"sqlite:///{db}"
    assert "from-env" not in settings.shown("audit_db")  # it may hold a password
    engine = Engine.load(ServiceSettings(model=str(DEFAULT_MODEL)))
    app = make_app(engine, audit_db=settings.audit_db)
    image = real_radiographs(datasets)["jpeg"][0]
    with asgi_client(app) as client:
        answer = client.post("/api/v1/predict", files={"file": ("a.jpg", image.read_bytes())})
    assert answer.status_code == 200
    events = _export(str(db))
    assert [(e["request_id"], e["input_sha256"]) for e in events] == [
        (answer.headers["x-request-id"], sha256_of(image))
    ]
