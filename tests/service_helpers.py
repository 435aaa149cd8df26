"""The service under test, two ways.

In process (tests/test_api.py): `make_app` builds the FastAPI app with test settings and the
real model loaded once per session (`loaded_engine`), swapped in through the engine
dependency; an httpx client talks to it over ASGI, no sockets.

A real server (tests/test_server.py, tests/test_browser.py): `covid-cxr serve` in a
subprocess, one per test session, started by whichever test needs it first. It runs with an
API key, CORS for one origin and small limits so that every limit can be hit cheaply, and
with an audit hook that records every file the server process opens for writing: the proof
that uploads never touch the disk.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from covid_cxr.paths import DEFAULT_MODEL
from covid_cxr.service.app import create_app
from covid_cxr.service.dependencies import get_engine
from covid_cxr.service.settings import ServiceSettings
from server_launcher import RunningServer, start_server

API_KEY = "test-key-0123456789"
CORS_ORIGIN = "http://allowed.example"
MAX_UPLOAD_MB = 4
MAX_BATCH_FILES = 4
UPLOAD_TIMEOUT_S = 3
MAX_CONNECTIONS = 32
MAX_HEADER_KB = 16
KEEP_ALIVE_S = 1
SERVER_ARGS = [
    "--max-upload-mb", str(MAX_UPLOAD_MB),
    "--max-batch-files", str(MAX_BATCH_FILES),
    "--max-batch-mb", "8",
    "--inference-workers", "1",
    "--queue-size", "2",
    "--threads", "1",
    "--cors-origin", CORS_ORIGIN,
    "--max-connections", str(MAX_CONNECTIONS),
    "--max-header-kb", str(MAX_HEADER_KB),
    "--keep-alive-s", str(KEEP_ALIVE_S),
]  # fmt: skip

# Runs in the server process before covid-cxr starts: every open() with a write flag is
# appended, with its time, to the file named by argv[1] (opened before the hook exists).
BOOT = """
import os, sys, time
log = open(sys.argv[1], "a", buffering=1)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    if event == "open" and len(args) >= 3 and isinstance(args[2], int) and args[2] & WRITE:
        log.write(f"{time.time():.6f} {args[0]!r}\\n")
    elif event in ("tempfile.mkstemp", "tempfile.mkdtemp"):
        log.write(f"{time.time():.6f} {event} {args[0]!r}\\n")
sys.addaudithook(hook)
from covid_cxr.cli import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class Server:
    """The running server plus the record of files it opened for writing."""

    running: RunningServer
    writes_path: Path

    @property
    def url(self) -> str:
        return self.running.url

    def log_text(self) -> str:
        return self.running.log_text()

    def writes_since(self, since: float) -> list[str]:
        """Files the server opened for writing after time `since` (seconds since the epoch)."""
        lines = self.writes_path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if float(line.split(" ", 1)[0]) >= since]

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)


def service_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model when it exists, else a small real (untrained) efficientnet-lite0."""
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    import torch

    from covid_cxr.imaging import PreprocessConfig
    from covid_cxr.models import create
    from covid_cxr.models.checkpoint import ModelInfo, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.getbasetemp() / "service-model" / "random-lite0.pt"
    if not path.is_file():
        info = ModelInfo(
            name="efficientnet-lite0",
            preprocess=PreprocessConfig(size=224),
            thresholds={"default": 0.5},
            version="test-untrained",
        )
        save_checkpoint(path, create("efficientnet-lite0", pretrained=False), info)
    return path


TEST_SETTINGS = {
    "api_key": API_KEY,
    "cors_origins": (CORS_ORIGIN,),
    "allowed_hosts": ("testserver",),
    "max_upload_mb": MAX_UPLOAD_MB,
    "max_batch_files": MAX_BATCH_FILES,
    "max_batch_mb": 8.0,
    "inference_workers": 1,
    "queue_size": 2,
}


def make_app(engine: object | None, **settings: object) -> FastAPI:
    """The app with the test settings (plus `settings`), serving `engine` through the engine
    dependency (None: the model is not loaded; the lifespan, which loads it, does not run)."""
    app = create_app(ServiceSettings(**{**TEST_SETTINGS, **settings}))
    if engine is not None:
        app.dependency_overrides[get_engine] = lambda: engine
    return app


@contextmanager
def asgi_client(app: FastAPI, key: str | None = API_KEY) -> Iterator[httpx.Client]:
    """A client that calls the app in this process, without sockets. The app's lifespan does
    not run, so no model loads in the background: the engine is whatever `make_app` put in."""
    from fastapi.testclient import TestClient

    client = TestClient(app, base_url="http://testserver")
    if key:
        client.headers["X-API-Key"] = key
    try:
        yield client
    finally:
        client.close()


_SERVERS: dict[str, Server] = {}


def shared_server(request: pytest.FixtureRequest) -> Server:
    """The session's one server, started on first use and stopped when the session ends."""
    if "main" not in _SERVERS:
        factory = request.getfixturevalue("tmp_path_factory")
        workdir = factory.mktemp("server")
        writes = workdir / "writes.log"
        writes.touch()
        running = start_server(
            ["--model", str(service_model(factory)), *SERVER_ARGS],
            workdir / "server.log",
            env={
                "COVID_CXR_API_KEY": API_KEY,
                "COVID_CXR_UPLOAD_TIMEOUT_S": str(UPLOAD_TIMEOUT_S),
                "PYTHONDONTWRITEBYTECODE": "1",
            },
            cwd=workdir,
            python_args=["-c", BOOT, str(writes)],
        )
        request.config.add_cleanup(running.stop)
        _SERVERS["main"] = Server(running, writes)
    return _SERVERS["main"]


def first_image(folder: Path, suffixes: tuple[str, ...], mode: str, side: int) -> Path:
    """The first image (sorted by name) of that format, colour mode and longest side."""
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes:
            with Image.open(path) as image:
                if image.mode == mode and max(image.size) == side:
                    return path
    raise FileNotFoundError(f"no {mode} {suffixes} image with longest side {side} in {folder}")


def real_jpeg(datasets: Path) -> Path:
    """A 640-pixel grayscale JPEG radiograph from the COVID-19 image data collection."""
    return first_image(datasets / "covid-chestxray-dataset" / "images", (".jpg",), "L", 640)


def real_png(datasets: Path) -> Path:
    """A 448-pixel grayscale PNG from the NIH ChestX-ray8 subset."""
    return first_image(datasets / "nih-chestxray8-subset" / "No_Finding", (".png",), "L", 448)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
