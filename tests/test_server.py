"""The real server (`covid-cxr serve`, uvicorn on loopback) over real sockets: what only a
real server shows, namely limits while the bytes stream in, connection handling, overload,
and that uploads never reach the disk or the log. The API's behaviour is in test_api.py.
"""

from __future__ import annotations

import resource
import shutil
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import require
from imaging_helpers import make_dicom
from server_launcher import start_server
from service_helpers import (
    API_KEY,
    KEEP_ALIVE_S,
    MAX_HEADER_KB,
    MAX_UPLOAD_MB,
    UPLOAD_TIMEOUT_S,
    Server,
    png_bytes,
    real_png,
    service_model,
    shared_server,
)

pytestmark = pytest.mark.slow

PREDICT = "/api/v1/predict"
BATCH = "/api/v1/predict/batch"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PAT-31337-XYZ"
IDLE_SOCKETS = 1100


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Server:
    return shared_server(request)


@pytest.fixture(scope="module")
def client(server: Server) -> httpx.Client:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def png(datasets: Path) -> bytes:
    return real_png(datasets).read_bytes()


def upload(data: bytes, name: str = "image") -> dict:
    return {"file": (name, data, "application/octet-stream")}


def connect(server: Server, timeout: float = 10.0) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_answer(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection or goes quiet."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed this socket (after at most a short plain-text refusal)."""
    sock.settimeout(0.2)
    try:
        while chunk := sock.recv(4096):
            if not chunk.startswith(b"HTTP/1.1 503"):
                return False
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def stalled_upload(server: Server) -> socket.socket:
    """A predict request that announces 100 kB of body, sends 5 bytes and stops."""
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {API_KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
    )
    sock = connect(server, timeout=UPLOAD_TIMEOUT_S + 10)
    sock.sendall(head.encode())
    return sock


def test_uploads_never_touch_the_disk_nor_the_log(
    server: Server, client: httpx.Client, datasets: Path
) -> None:
    # A real radiograph enlarged, with noise that does not compress: a PNG well above
    # Starlette's 1 MiB spool-to-disk threshold that the input gate still accepts.
    chest = Image.open(real_png(datasets)).convert("L").resize((1400, 1400))
    noise = np.random.default_rng(0).integers(-48, 49, (1400, 1400))
    noisy = np.clip(np.asarray(chest, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    large = png_bytes(noisy)
    assert 1.5 * 2**20 < len(large) < MAX_UPLOAD_MB * 2**20
    dicom = make_dicom(noisy[::2, ::2], PatientName=PATIENT_NAME, PatientID=PATIENT_ID)
    since = time.time()
    assert client.post(PREDICT, files=upload(large, "large.png")).status_code == 200
    assert client.post(PREDICT, files=upload(dicom, "patient.dcm")).status_code == 200
    batch = [("files", ("a.png", large)), ("files", ("b.dcm", dicom))]
    assert client.post(BATCH, files=batch).json()["failed"] == 0
    time.sleep(0.2)
    assert server.writes_since(since) == []
    log = server.log_text()
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe", "patient.dcm", "large.png", API_KEY):
        assert secret not in log


def test_a_streamed_oversize_upload_is_cut_off(client: httpx.Client) -> None:
    """No Content-Length (chunked): the server must count the bytes as they arrive."""
    boundary = "cut-off-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def chunks():
        yield head
        for _ in range(MAX_UPLOAD_MB + 1):
            yield bytes(2**20)
        yield f"\r\n--{boundary}--\r\n".encode()

    streamed = client.post(
        PREDICT,
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "upload_too_large"
    assert client.get("/healthz").status_code == 200


def test_stalled_uploads_hold_a_place_and_get_408_quickly(
    server: Server, client: httpx.Client, png: bytes
) -> None:
    """The test server admits 3 requests (1 running + 2 waiting). Three stalled uploads fill
    it: a fourth request is refused at once; the stalled ones are dropped after the 2 s grace
    (they send nothing, far below the minimum rate), well before the upload timeout."""
    start = time.monotonic()
    stalled = [stalled_upload(server) for _ in range(3)]
    time.sleep(0.3)
    refused = client.post(PREDICT, files=upload(png))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    answers = [read_answer(sock) for sock in stalled]
    for sock in stalled:
        sock.close()
    assert time.monotonic() - start < UPLOAD_TIMEOUT_S + 2
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"upload_timeout"' in answer
    assert client.post(PREDICT, files=upload(png)).status_code == 200


def test_a_huge_request_head_gets_431(server: Server, client: httpx.Client) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        try:
            for _ in range(64):  # 4 MiB of one header, far above the limit
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    head = "X-Fine: " + "a" * (MAX_HEADER_KB * 1024 // 2)
    name, value = head.split(": ")
    assert client.get("/healthz", headers={name: value}).status_code == 200


def test_idle_connections_cannot_lock_out_health_checks(server: Server) -> None:
    """1,100 sockets that never send anything (what once made /healthz fail, with the server's
    1,024 file descriptors used up): /healthz still answers at once, and the server closes
    every idle socket, keeping at most MAX_CONNECTIONS (32) open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    require(hard >= IDLE_SOCKETS + 100, f"this test needs {IDLE_SOCKETS + 100} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, IDLE_SOCKETS + 100), hard))
    idle = [connect(server, timeout=KEEP_ALIVE_S + 5) for _ in range(IDLE_SOCKETS)]
    try:
        start = time.perf_counter()
        health = httpx.get(f"{server.url}/healthz", timeout=5.0)
        assert health.status_code == 200
        assert time.perf_counter() - start < 2.0
        time.sleep(KEEP_ALIVE_S + 0.5)
        still_open = [sock for sock in idle if not closed_by_server(sock)]
        assert not still_open, f"{len(still_open)} of {len(idle)} idle sockets still open"
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_overload_answers_503_fast_and_health_stays_up(
    server: Server, client: httpx.Client, png: bytes
) -> None:
    """The test server runs 1 prediction at a time with 2 waiting: a burst of 12 must be
    partly refused with 503 + Retry-After, while /healthz keeps answering."""
    barrier = threading.Barrier(12)

    def one(_: int) -> httpx.Response:
        with server.client() as own:
            barrier.wait()
            return own.post(PREDICT, params={"cam": "true"}, files=upload(png))

    with ThreadPoolExecutor(12) as pool:
        burst = pool.map(one, range(12))
        time.sleep(0.05)
        start = time.perf_counter()
        health = client.get("/healthz")
        health_s = time.perf_counter() - start
        responses = list(burst)
    assert health.status_code == 200 and health_s < 2.0
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert client.post(PREDICT, files=upload(png)).status_code == 200


def test_https_with_a_certificate(tmp_path_factory: pytest.TempPathFactory) -> None:
    require(shutil.which("openssl") is not None, "openssl missing (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    serve_args = ["--model", str(service_model(tmp_path_factory)), "--ssl-certfile", str(cert)]
    running = start_server([*serve_args, "--ssl-keyfile", str(key)], folder / "server.log")
    try:
        assert running.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"{running.url}/healthz", verify=trusted).json() == {"status": "ok"}
        with pytest.raises(httpx.TransportError):  # plain HTTP is not spoken
            httpx.get(running.url.replace("https", "http") + "/healthz", timeout=5.0)
    finally:
        running.stop()
