"""The PACS round trip against a real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`).

Each test module run starts its own Orthanc on a free loopback port with a configuration
written here (basic authentication on, no DICOM port), uploads DICOMs built from real
radiographs, runs `covid-cxr pacs`, and reads what came back over DICOMweb.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conftest import require
from covid_cxr.cli import main
from covid_cxr.inference.predictor import Predictor
from covid_cxr.pacs.dicomweb import Auth, Backoff, DicomWebClient
from covid_cxr.pacs.roundtrip import StudyResult
from covid_cxr.pacs.watch import ProcessedStudies, run_once, watch
from imaging_helpers import make_dicom

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "ci", "pacs-test-secret"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Orthanc:
    folder: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> None:
        config = self.folder / "orthanc.json"
        config.write_text(
            "{"
            f'"Name": "covid-cxr-test", "HttpPort": {self.port}, "DicomServerEnabled": false, '
            f'"StorageDirectory": "{self.folder / "storage"}", '
            f'"IndexDirectory": "{self.folder / "index"}", "RemoteAccessAllowed": false, '
            f'"AuthenticationEnabled": true, "RegisteredUsers": {{"{USER}": "{PASSWORD}"}}, '
            f'"Plugins": ["{PLUGIN}"], "DicomWeb": {{"Enable": true, "Root": "/dicom-web/"}}'
            "}"
        )
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/studies", auth=(USER, PASSWORD)).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError((self.folder / "orthanc.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require(
        Path(ORTHANC).is_file() and PLUGIN.is_file(),
        "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc "
        "orthanc-dicomweb; `make test` does it when run as root)",
    )
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(orthanc: Orthanc) -> Iterator[DicomWebClient]:
    with DicomWebClient(orthanc.url, Auth(USER, PASSWORD), backoff=Backoff(patience=2)) as c:
        yield c


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


def upload_study(client: DicomWebClient, image: Path, **attributes: str) -> Dataset:
    """A one-image DX study made from a real radiograph, stored in the PACS; its header."""
    pixels = np.asarray(Image.open(image).convert("L"))
    data = make_dicom(
        pixels,
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
        PatientName="Synthetic^Patient",
        PatientID="SYN-" + image.stem[:8],
        StudyDate="20260101",
        **{"ViewPosition": "PA", **attributes},
    )
    client.store([data])
    return pydicom.dcmread(io.BytesIO(data))


def results_of(client: DicomWebClient, study: str) -> dict[str, list[Dataset]]:
    """The covid-cxr result objects in the study, by modality (SR, OT)."""
    found: dict[str, list[Dataset]] = {}
    for series in client.search_series(study, includefield="SeriesDescription"):
        if not str(series.get("SeriesDescription", "")).startswith("covid-cxr"):
            continue
        for instance in client.search_instances(study, series.SeriesInstanceUID):
            data = client.retrieve_instance(
                study, series.SeriesInstanceUID, instance.SOPInstanceUID
            )
            found.setdefault(series.Modality, []).append(pydicom.dcmread(io.BytesIO(data)))
    return found


def content_items(dataset: Dataset) -> Iterator[Dataset]:
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def _run_pacs(*args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("COVID_CXR_PACS_PASSWORD", PASSWORD)
    return main(["pacs", *args])


def test_watch_stores_sr_and_sc_in_each_study_and_never_twice(
    orthanc: Orthanc,
    client: DicomWebClient,
    datasets: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    covid = upload_study(client, next((datasets / "covid-19-image-repository/png").glob("*.png")))
    normal = upload_study(
        client, next((datasets / "nih-chestxray8-subset/No_Finding").glob("*.png")), Modality="CR"
    )
    state = tmp_path / "state.db"
    audit = f"sqlite:///{tmp_path / 'audit.db'}"
    args = (
        *("watch", "--url", orthanc.url, "--user", USER, "--state", str(state), "--once"),
        *("--audit-db", audit),
    )
    start = time.perf_counter()
    assert _run_pacs(*args, monkeypatch=monkeypatch) == 0
    per_study = (time.perf_counter() - start) / 2
    log = capsys.readouterr().err
    assert "2 new study(ies) processed" in log, log
    print(f"round trip: {per_study:.2f} s per study (model load included)")

    for source in (covid, normal):
        found = results_of(client, source.StudyInstanceUID)
        (sr,), (sc,) = found["SR"], found["OT"]
        for result in (sr, sc):
            assert result.StudyInstanceUID == source.StudyInstanceUID
            assert result.PatientID == source.PatientID
            assert str(result.PatientName) == str(source.PatientName)
            assert result.SeriesInstanceUID != source.SeriesInstanceUID
            assert result.SOPInstanceUID != source.SOPInstanceUID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        referenced = {
            item.ReferencedSOPInstanceUID
            for series in evidence.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert source.SOPInstanceUID in referenced and sc.SOPInstanceUID in referenced
        numbers = {
            item.ConceptNameCodeSequence[0].CodeMeaning: float(
                item.MeasuredValueSequence[0].NumericValue
            )
            for item in content_items(sr)
            if item.ValueType == "NUM"
        }
        probability = numbers["Probability of COVID-19"]
        assert 0.0 <= probability <= 1.0
        texts = [item.TextValue for item in content_items(sr) if item.ValueType == "TEXT"]
        assert "Research use only, not a medical device." in texts
        assert sc.pixel_array.shape[2] == 3 and sc.pixel_array.shape[0] > 100

    # Every prediction entered the audit trail, without the patient: the instance is known by
    # its bytes' sha256 only.
    trail = tmp_path / "trail.jsonl"
    export = ["audit", "export", "--audit-db", audit, "--format", "jsonl", "--output", str(trail)]
    assert main(export) == 0
    events = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [(e["outcome"], e["input_format"]) for e in events] == [("predicted", "DICOM")] * 2
    assert all(len(e["input_sha256"]) == 64 for e in events)
    assert "Synthetic" not in trail.read_text()

    # A restarted watcher remembers what it did: nothing is processed or stored twice.
    assert _run_pacs(*args, monkeypatch=monkeypatch) == 0
    assert "0 new study(ies) processed; 2 done in all" in capsys.readouterr().err
    assert [len(results_of(client, covid.StudyInstanceUID)[m]) for m in ("SR", "OT")] == [1, 1]


def test_forgotten_state_still_never_duplicates(
    orthanc: Orthanc, client: DicomWebClient, datasets: Path, tmp_path: Path, predictor: Predictor
) -> None:
    study = upload_study(client, sorted((datasets / "jsrt/images").glob("*.png"))[0])
    memory = ProcessedStudies(tmp_path / "first.db")
    run_once(client, predictor, memory, lambda _: None)
    # A crash after storing but before remembering: a fresh state file, same PACS.
    results: list[StudyResult] = []
    run_once(client, predictor, ProcessedStudies(tmp_path / "fresh.db"), results.append)
    mine = next(r for r in results if r.study_uid == study.StudyInstanceUID)
    assert mine.skipped and mine.stored == 0
    assert len(results_of(client, study.StudyInstanceUID)["SR"]) == 1


def test_watcher_waits_out_a_pacs_that_is_down(
    orthanc: Orthanc, client: DicomWebClient, datasets: Path, tmp_path: Path, predictor: Predictor
) -> None:
    memory = ProcessedStudies(tmp_path / "state.db")
    done: list[StudyResult] = []
    orthanc.stop()
    stop = threading.Event()
    slow = DicomWebClient(orthanc.url, Auth(USER, PASSWORD), backoff=Backoff(patience=0.5))
    thread = threading.Thread(
        target=watch,
        args=(slow, predictor, memory, done.append),
        kwargs={"interval": 0.3, "stop": stop, "max_wait": 1.0},
    )
    thread.start()
    try:
        time.sleep(2.0)  # several failed polls while Orthanc is down
        assert thread.is_alive() and not done
        orthanc.start()
        study = upload_study(client, sorted((datasets / "openist-normal/images").glob("*.jpg"))[0])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            r.study_uid == study.StudyInstanceUID for r in done
        ):
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=30)
        slow.close()
    mine = [r for r in done if r.study_uid == study.StudyInstanceUID]
    assert len(mine) == 1 and mine[0].predicted == 1
    assert len(results_of(client, study.StudyInstanceUID)["SR"]) == 1


def test_wrong_password_is_a_clear_error(
    orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COVID_CXR_PACS_PASSWORD", "wrong")
    code = main(["pacs", "process", "--url", orthanc.url, "--user", USER, "--study", "1.2.3"])
    assert code == 2
    assert "refused the credentials" in capsys.readouterr().err
