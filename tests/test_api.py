"""The REST API against a real server (`covid-cxr serve`, uvicorn on loopback) over HTTP.

Real radiographs in, and every kind of bad input the issue names: each must get a JSON error
with a 4xx status, never a 500, and the server must keep answering afterwards.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.cli import main
from covid_cxr.errors import ConfigError
from covid_cxr.service.settings import ServiceSettings
from imaging_helpers import make_dicom, png_claiming, truncated
from service_helpers import (
    API_KEY,
    CORS_ORIGIN,
    MAX_BATCH_FILES,
    MAX_UPLOAD_MB,
    UPLOAD_TIMEOUT_S,
    Server,
    png_bytes,
    real_jpeg,
    real_png,
    shared_server,
)

pytestmark = pytest.mark.slow

PREDICT = "/api/v1/predict"
BATCH = "/api/v1/predict/batch"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PAT-31337-XYZ"


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Server:
    return shared_server(request)


@pytest.fixture(scope="module")
def client(server: Server) -> httpx.Client:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def jpeg(datasets: Path) -> bytes:
    return real_jpeg(datasets).read_bytes()


@pytest.fixture(scope="module")
def png(datasets: Path) -> bytes:
    return real_png(datasets).read_bytes()


@pytest.fixture(scope="module")
def stretched(jpeg: bytes) -> np.ndarray:
    """The real JPEG's grey levels stretched to 0..255, so that a PNG and a DICOM of them
    decode to the very same pixels (the DICOM reader rescales min..max to 0..1)."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float32)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255.0
    return (pixels + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def dicom(stretched: np.ndarray) -> bytes:
    return make_dicom(stretched, PatientName=PATIENT_NAME, PatientID=PATIENT_ID)


def upload(data: bytes, name: str = "image", content_type: str = "application/octet-stream"):
    return {"file": (name, data, content_type)}


def decode_png(image: dict) -> Image.Image:
    decoded = Image.open(io.BytesIO(base64.b64decode(image["png_base64"])))
    decoded.load()
    assert decoded.format == "PNG"
    assert decoded.size == (image["width"], image["height"])
    return decoded


def assert_error(response: httpx.Response, status: int, code: str | set[str]) -> dict:
    """A JSON error of the documented shape, with the expected status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] in ({code} if isinstance(code, str) else code), error
    assert error["message"]
    return error


def test_health_ready_and_model_card(server: Server, client: httpx.Client) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    card = client.get("/api/v1/model").json()
    assert ready["model_version"] == card["version"]
    assert card["notice"] == RESEARCH_NOTICE
    assert 0.0 < card["threshold"] < 1.0
    assert card["threshold"] == card["thresholds"][card["operating_point"]]
    assert card["preprocess"]["size"] >= 16
    assert card["intended_use"] and card["limitations"]
    assert card["service"]["max_upload_bytes"] == MAX_UPLOAD_MB * 2**20
    assert card["service"]["formats"] == ["PNG", "JPEG", "DICOM"]
    assert card["service"]["api_key_required"] is True


def test_openapi_describes_the_upload(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"][PREDICT]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["format"] == "binary"
    assert "422" in spec["paths"][PREDICT]["post"]["responses"]
    assert "/api/v1/predict/batch" in spec["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "<script>" not in docs.text  # the CSP forbids inline scripts
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200


def test_predict_real_jpeg(client: httpx.Client, jpeg: bytes) -> None:
    response = client.post(PREDICT, files=upload(jpeg, "chest.jpg", "image/jpeg"))
    assert response.status_code == 200, response.text
    result = response.json()
    assert 0.0 <= result["probability"] <= 1.0
    assert result["positive"] == (result["probability"] >= result["threshold"])
    assert result["label"] == ("COVID-19" if result["positive"] else "non-COVID")
    assert (result["format"], result["width"]) == ("JPEG", 640)
    assert result["filename"] == "chest.jpg"
    assert result["notice"] == RESEARCH_NOTICE
    assert result["cam"] is None and result["preview"] is None
    assert {"read", "preprocess", "model", "total"} <= set(result["timings_ms"])
    again = client.post(PREDICT, files=upload(jpeg)).json()
    assert again["probability"] == pytest.approx(result["probability"], abs=1e-6)


def test_cam_is_a_png_of_the_radiographs_size(client: httpx.Client, png: bytes) -> None:
    response = client.post(PREDICT, params={"cam": "true"}, files=upload(png, "nih.png"))
    assert response.status_code == 200, response.text
    result = response.json()
    heat = decode_png(result["cam"])
    assert heat.size == (result["width"], result["height"]) == Image.open(io.BytesIO(png)).size
    rgb = np.asarray(heat.convert("RGB")).astype(int)
    # A heat map is coloured; the radiograph alone is grey (R == G == B everywhere).
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 20


def test_cam_and_preview_as_form_fields(client: httpx.Client, png: bytes) -> None:
    response = client.post(PREDICT, data={"cam": "true", "preview": "1"}, files=upload(png))
    result = response.json()
    assert result["cam"] is not None
    preview = np.asarray(decode_png(result["preview"]))
    original = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert preview.shape == original.shape
    assert np.abs(preview.astype(int) - original).max() <= 1


def test_dicom_matches_the_same_pixels_as_png(
    client: httpx.Client, stretched: np.ndarray, dicom: bytes
) -> None:
    as_png = client.post(PREDICT, files=upload(png_bytes(stretched))).json()
    response = client.post(
        PREDICT, params={"cam": "1", "preview": "1"}, files=upload(dicom, "study.dcm")
    )
    assert response.status_code == 200, response.text
    as_dicom = response.json()
    assert as_dicom["format"] == "DICOM"
    assert as_dicom["probability"] == pytest.approx(as_png["probability"], abs=1e-5)
    height, width = stretched.shape
    assert decode_png(as_dicom["preview"]).size == (width, height)
    assert decode_png(as_dicom["cam"]).size == (width, height)


def test_content_type_and_extension_are_not_trusted(client: httpx.Client, png: bytes) -> None:
    as_text = client.post(PREDICT, files=upload(png, "notes.txt", "text/plain"))
    assert as_text.status_code == 200, as_text.text
    assert as_text.json()["format"] == "PNG"
    fake = client.post(PREDICT, files=upload(b"just some text\n" * 20, "scan.png", "image/png"))
    error = assert_error(fake, 415, "not_an_image")
    assert "scan.png" in error["message"]


def _bad_requests(jpeg: bytes, dicom_without_pixels: bytes) -> dict[str, tuple]:
    """name -> (request keyword arguments, expected status, expected code(s))."""
    multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    tiny = png_bytes(np.zeros((10, 10), np.uint8))
    return {
        "no body at all": ({}, 415, "not_multipart"),
        "json instead of a form": ({"json": {"file": "x"}}, 415, "not_multipart"),
        "multipart with 0 bytes": ({"headers": multipart, "content": b""}, 400, "missing_file"),
        "urlencoded form": ({"data": {"cam": "true"}}, 415, "not_multipart"),
        "form without a file": ({"files": {"cam": (None, "true")}}, 400, "missing_file"),
        "malformed multipart": (
            {"headers": multipart, "content": b"garbage without boundaries"},
            400,
            "bad_multipart",
        ),
        "0-byte file": ({"files": upload(b"", "empty.png")}, 422, "empty_file"),
        "text file": ({"files": upload(b"hello\n" * 100, "a.txt")}, 415, "not_an_image"),
        "pdf": ({"files": upload(b"%PDF-1.4\n" + b"0" * 500, "a.pdf")}, 415, "not_an_image"),
        "truncated jpeg": ({"files": upload(truncated(jpeg), "cut.jpg")}, 422, "corrupt_image"),
        "50000x50000 png": (
            {"files": upload(png_claiming(50_000, 50_000), "bomb.png")},
            422,
            "image_too_large",
        ),
        "10x10 png": ({"files": upload(tiny, "tiny.png")}, 422, "image_too_small"),
        "dicom without pixels": (
            {"files": upload(dicom_without_pixels, "report.dcm")},
            415,
            "not_an_image",
        ),
        "two files to single predict": (
            {"files": [("file", ("a.jpg", jpeg)), ("file", ("b.jpg", jpeg))]},
            400,
            "too_many_files",
        ),
        "bad cam flag": (
            {"params": {"cam": "maybe"}, "files": upload(jpeg)},
            422,
            "invalid_request",
        ),
        "bad cam form field": (
            {"data": {"cam": "maybe"}, "files": upload(jpeg)},
            400,
            "bad_request",
        ),
    }


def test_bad_inputs_get_4xx_json_never_500(
    server: Server, client: httpx.Client, jpeg: bytes
) -> None:
    dicom_without_pixels = make_dicom(None, PatientName=PATIENT_NAME)
    failures = []
    for name, (kwargs, status, code) in _bad_requests(jpeg, dicom_without_pixels).items():
        response = client.post(PREDICT, **kwargs)
        try:
            assert_error(response, status, code)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
    assert_error(client.get(PREDICT), 405, "method_not_allowed")
    assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
    assert client.get("/healthz").status_code == 200
    assert client.post(PREDICT, files=upload(jpeg)).status_code == 200


def test_oversize_uploads_are_cut_off_with_413(client: httpx.Client) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes((MAX_UPLOAD_MB + 1) * 2**20)
    declared = client.post(PREDICT, files=upload(big, "big.png"))
    assert_error(declared, 413, "upload_too_large")

    # No Content-Length (chunked): the server must count the bytes as they arrive.
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
    assert_error(streamed, 413, "upload_too_large")
    assert client.get("/healthz").status_code == 200


def test_batch_reports_each_file(client: httpx.Client, jpeg: bytes, png: bytes) -> None:
    files = [
        ("files", ("one.jpg", jpeg, "image/jpeg")),
        ("files", ("bad.txt", b"not an image at all", "text/plain")),
        ("files", ("cut.jpg", truncated(jpeg), "image/jpeg")),
        ("files", ("two.png", png, "image/png")),
    ]
    response = client.post(BATCH, files=files, params={"cam": "true"})
    assert response.status_code == 200, response.text
    batch = response.json()
    assert (batch["count"], batch["failed"]) == (4, 2)
    assert batch["notice"] == RESEARCH_NOTICE
    statuses = [(item["filename"], item["status"]) for item in batch["results"]]
    assert statuses == [("one.jpg", 200), ("bad.txt", 415), ("cut.jpg", 422), ("two.png", 200)]
    assert batch["results"][1]["error"]["code"] == "not_an_image"
    assert batch["results"][1]["result"] is None
    assert decode_png(batch["results"][3]["result"]["cam"]).size == Image.open(io.BytesIO(png)).size
    single = client.post(PREDICT, files=upload(jpeg)).json()
    assert batch["results"][0]["result"]["probability"] == pytest.approx(single["probability"])

    too_many = [("files", (f"{i}.jpg", jpeg)) for i in range(MAX_BATCH_FILES + 1)]
    assert_error(client.post(BATCH, files=too_many), 400, "too_many_files")


def test_batch_drops_an_oversize_file_only(client: httpx.Client, jpeg: bytes) -> None:
    big = b"\xff\xd8\xff" + bytes(MAX_UPLOAD_MB * 2**20)  # over the per-file limit
    files = [("files", ("big.jpg", big)), ("files", ("fine.jpg", jpeg))]
    batch = client.post(BATCH, files=files).json()
    assert [item["status"] for item in batch["results"]] == [413, 200]
    assert batch["results"][0]["error"]["code"] == "upload_too_large"


def test_security_headers_everywhere(server: Server, client: httpx.Client) -> None:
    for path in ("/", "/static/app.js", "/docs", "/api/v1/model", "/api/v1/nothing", "/healthz"):
        headers = client.get(path).headers
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert "server" not in headers
    assert client.get("/api/v1/model").headers["cache-control"] == "no-store"


def test_api_key_guards_the_api_only(server: Server, jpeg: bytes) -> None:
    with server.client(key=None) as anonymous, server.client(key="wrong-key-123") as wrong:
        assert_error(anonymous.get("/api/v1/model"), 401, "unauthorized")
        assert_error(wrong.post(PREDICT, files=upload(jpeg)), 401, "unauthorized")
        for open_path in ("/", "/healthz", "/readyz", "/static/style.css", "/openapi.json"):
            assert anonymous.get(open_path).status_code == 200, open_path
    with server.client(key=API_KEY) as right:
        assert right.get("/api/v1/model").status_code == 200


def test_cors_only_for_the_configured_origin(server: Server) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            f"{server.url}{PREDICT}",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
        )

    allowed = preflight(CORS_ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == CORS_ORIGIN
    refused = preflight("http://evil.example")
    assert "access-control-allow-origin" not in refused.headers


def test_uploads_never_touch_the_disk_nor_the_log(
    server: Server, client: httpx.Client, dicom: bytes, stretched: np.ndarray
) -> None:
    # A real radiograph enlarged, with noise that does not compress: a PNG well above
    # Starlette's 1 MiB spool-to-disk threshold that the input gate still accepts.
    enlarged = np.asarray(Image.fromarray(stretched).resize((1400, 1400)), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-48, 49, enlarged.shape)
    large = png_bytes(np.clip(enlarged + noise, 0, 255).astype(np.uint8))
    assert 1.5 * 2**20 < len(large) < MAX_UPLOAD_MB * 2**20
    since = time.time()
    assert client.post(PREDICT, files=upload(large, "large.png")).status_code == 200
    assert client.post(PREDICT, files=upload(dicom, "patient.dcm")).status_code == 200
    batch = [("files", ("a.png", large)), ("files", ("b.dcm", dicom))]
    assert client.post(BATCH, files=batch).json()["failed"] == 0
    time.sleep(0.2)
    assert server.writes_since(since) == []
    log = server.log_text()
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe", "patient.dcm", "large.png"):
        assert secret not in log


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
    assert_error(refused, 503, "overloaded")
    assert refused.headers["retry-after"] == "1"
    assert client.post(PREDICT, files=upload(png)).status_code == 200


def test_a_stalled_upload_gets_408(server: Server) -> None:
    """A client that announces a body and stops sending must not hold the server forever."""
    port = int(server.url.rsplit(":", 1)[1])
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {API_KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=UPLOAD_TIMEOUT_S + 10) as sock:
        sock.sendall(head.encode())
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert time.monotonic() - start < UPLOAD_TIMEOUT_S + 5
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"upload_timeout"' in answer


def test_serve_refuses_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model", str(tmp_path / "absent.onnx")]) == 2
    error = capsys.readouterr().err
    assert "absent.onnx" in error and "not found" in error


def test_settings_from_environment() -> None:
    settings = ServiceSettings.from_env(
        {
            "COVID_CXR_MAX_UPLOAD_MB": "8.5",
            "COVID_CXR_CORS_ORIGINS": "http://a.example, http://b.example",
            "COVID_CXR_ACCESS_LOG": "off",
            "COVID_CXR_API_KEY": "",
        },
        port=9000,
    )
    assert settings.max_upload_bytes == int(8.5 * 2**20)
    assert settings.cors_origins == ("http://a.example", "http://b.example")
    assert (settings.access_log, settings.api_key, settings.port) == (False, None, 9000)
    assert ServiceSettings.from_env(settings.to_env()) == settings
    with pytest.raises(ConfigError, match="COVID_CXR_PORT"):
        ServiceSettings.from_env({"COVID_CXR_PORT": "eighty"})
    with pytest.raises(ConfigError, match="max_batch_mb"):
        ServiceSettings.from_env({}, max_upload_mb=50.0, max_batch_mb=10.0)
    with pytest.raises(ConfigError, match="api_key"):
        ServiceSettings.from_env({"COVID_CXR_API_KEY": "short"})
