"""The REST API in process: the app with the real model swapped in through its engine
dependency, called over ASGI (no sockets, no subprocess), so each test costs milliseconds
plus the real predictions it asks for.

Real radiographs in, and every kind of bad input the issue names: each must get a JSON error
with a 4xx status, never a 500. Stand-in engines appear only where the model is beside the
point: admission under load (a slow engine) and the 500 path (a broken one).
Socket-level behaviour (limits while streaming, connections, the disk) is in test_server.py.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.service.engine import Engine
from covid_cxr.service.settings import ServiceSettings
from imaging_helpers import make_dicom, png_claiming, truncated
from service_helpers import (
    CORS_ORIGIN,
    MAX_BATCH_FILES,
    MAX_UPLOAD_MB,
    TEST_SETTINGS,
    asgi_client,
    make_app,
    png_bytes,
    real_jpeg,
    real_png,
    service_model,
)

PREDICT = "/api/v1/predict"
BATCH = "/api/v1/predict/batch"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PAT-31337-XYZ"


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The real model, loaded once in this process."""
    settings = ServiceSettings(**TEST_SETTINGS, model=str(service_model(tmp_path_factory)))
    return Engine.load(settings)


@pytest.fixture(scope="module")
def app(engine: Engine) -> FastAPI:
    app = make_app(engine)
    yield app
    app.state.service.pool.shutdown()


@pytest.fixture(scope="module")
def client(app: FastAPI) -> httpx.Client:
    with asgi_client(app) as client:
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


def test_health_ready_and_model_card(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
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
    # The training manifest's path is the operator's business; the figures are the client's.
    assert "manifest" not in card["metadata"]
    assert card["metrics"] or card["model_card"]
    assert all(0.0 <= value <= 1.0 for value in card["metrics"].values())


def test_the_model_card_fills_in_metrics(engine: Engine) -> None:
    card = engine.model_card(api_key_required=False)
    stored = engine.predictor.info.metadata
    assert card.metrics == {k: v for k, v in stored.items() if k.startswith("val_")}
    assert "manifest" in stored and "manifest" not in card.metadata
    assert card.model_card and "README.md" in card.model_card


def test_not_ready_until_the_model_loads() -> None:
    app = make_app(None)
    with asgi_client(app) as client:
        assert client.get("/healthz").status_code == 200
        for response in (client.get("/readyz"), client.post(PREDICT, files=upload(b"x"))):
            assert_error(response, 503, "not_ready")
            assert response.headers["retry-after"] == "2"


def test_openapi_describes_the_upload(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"][PREDICT]["post"]
    body = operation["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["format"] == "binary"
    assert {"422", "503"} <= set(operation["responses"])
    assert "wait" in {parameter["name"] for parameter in operation["parameters"]}
    assert BATCH in spec["paths"]
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
        "negative wait": (
            {"params": {"wait": "-1"}, "files": upload(jpeg)},
            422,
            "invalid_request",
        ),
    }


def test_bad_inputs_get_4xx_json_never_500(client: httpx.Client, jpeg: bytes) -> None:
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
    assert client.post(PREDICT, files=upload(jpeg)).status_code == 200


def test_oversize_uploads_are_cut_off_with_413(client: httpx.Client) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes((MAX_UPLOAD_MB + 1) * 2**20)
    assert_error(client.post(PREDICT, files=upload(big, "big.png")), 413, "upload_too_large")
    # Just over the file limit but within the body's allowance: cut off per file.
    over = b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD_MB * 2**20)
    assert_error(client.post(PREDICT, files=upload(over, "over.png")), 413, "upload_too_large")


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


def test_security_headers_everywhere(client: httpx.Client) -> None:
    for path in ("/", "/static/app.js", "/docs", "/api/v1/model", "/api/v1/nothing", "/healthz"):
        headers = client.get(path).headers
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert len(headers["x-request-id"]) == 32
    assert client.get("/api/v1/model").headers["cache-control"] == "no-store"


def test_api_key_guards_the_api_only(app: FastAPI, jpeg: bytes) -> None:
    with asgi_client(app, key=None) as anonymous, asgi_client(app, key="wrong-key-123") as wrong:
        assert_error(anonymous.get("/api/v1/model"), 401, "unauthorized")
        assert_error(wrong.post(PREDICT, files=upload(jpeg)), 401, "unauthorized")
        for open_path in ("/", "/healthz", "/readyz", "/static/style.css", "/openapi.json"):
            assert anonymous.get(open_path).status_code == 200, open_path


def test_cors_only_for_the_configured_origin(client: httpx.Client) -> None:
    def preflight(origin: str) -> httpx.Response:
        return client.options(
            PREDICT,
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


def test_host_header_must_name_this_server(client: httpx.Client) -> None:
    """DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends Host: evil.example."""
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):
        assert_error(client.get("/healthz", headers={"Host": host}), 400, "bad_host")
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "testserver"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    listening_everywhere = make_app(None, host="0.0.0.0", allowed_hosts=("cxr.example",))
    with asgi_client(listening_everywhere) as other:
        for host in ("10.1.2.3:8000", "cxr.example"):
            assert other.get("/healthz", headers={"Host": host}).status_code == 200, host
        assert_error(other.get("/healthz", headers={"Host": "evil.example"}), 400, "bad_host")


def test_repeated_wrong_keys_get_429(caplog: pytest.LogCaptureFixture) -> None:
    secret = "wrong-" + "k" * 300  # a long wrong key must not surface anywhere either
    with asgi_client(make_app(None), key=secret) as wrong:
        statuses = [wrong.get("/api/v1/model").status_code for _ in range(12)]
        assert statuses[:10] == [401] * 10
        blocked = wrong.get("/api/v1/model")
        assert_error(blocked, 429, "too_many_requests")
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert secret not in blocked.text
        # The block is per address; the page and health checks stay open.
        assert wrong.get("/healthz").status_code == 200
    assert secret not in caplog.text
