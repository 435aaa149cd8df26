"""The package as a new user gets it, and what ONNX Runtime does behind our back.

Packaging: build the wheel from a copy of the sources, install it with the base dependencies
only into a fresh venv (pip may download; its cache makes reruns quick), and from another
folder predict real radiographs (PNG and DICOM, with DICOM results) and serve one, using the
model inside the wheel, with torch, scikit-learn, matplotlib and onnx absent.

Telemetry: ONNX Runtime's Linux wheels write a device id under ~/.cache and look up
mobile.events.data.microsoft.com a few seconds after the first session. Every covid-cxr
process must do neither; a bare ONNX Runtime process with telemetry left on is the control
that shows the checks would see it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

import covid_cxr
from conftest import require
from covid_cxr.paths import DEFAULT_MODEL, REPO_ROOT, SHIPPED, shipped_model
from imaging_helpers import make_dicom
from server_launcher import RunningServer, start_server

HANNOVER = "covid-19-image-repository/png"
TRAIN_ONLY = ("torch", "sklearn", "matplotlib", "onnx")
TELEMETRY_HOST = "events\\4data\\tmicrosoft"  # how strace prints the DNS query's labels
DEVICE_ID = ".cache/Microsoft"
# ONNX Runtime's uploader writes its device id and resolves its host about 7 s after the first
# session on an idle machine; the control waits for it up to this limit (and proves it).
TELEMETRY_LIMIT_S = 60


@dataclass(frozen=True)
class Installed:
    python: Path
    script: Path
    site: Path


def fresh_home(home: Path) -> dict[str, str]:
    """A HOME (and cache) of its own, and ONNX Runtime's switch unset: this test process has
    it set (importing covid_cxr sets it), so a child must show it sets it itself."""
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "ORT_DISABLE_TELEMETRY": ""}


def outside_env() -> dict[str, str]:
    """This environment without anything pointing at the source tree (HOME kept: pip cache)."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "COVID_CXR_MODEL", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}


def clean_env(home: Path) -> dict[str, str]:
    """`outside_env` with a fresh home."""
    return {**outside_env(), **fresh_home(home)}


def run(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from a copy of the sources, installed with the base set only."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        source.mkdir(exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    pip = [sys.executable, "-m", "pip"]
    wheel_dir = str(root / "dist")
    run(
        [*pip, "wheel", "--no-deps", "-q", "-w", wheel_dir, str(source)],
        env=outside_env(),
        timeout=300,
    )
    (wheel,) = (root / "dist").glob("covid_cxr-*.whl")
    assert wheel.name.startswith(f"covid_cxr-{covid_cxr.__version__}-")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], env=outside_env(), timeout=600)
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = run([str(python), "-c", where], env=outside_env())
    return Installed(python, root / "venv" / "bin" / "covid-cxr", Path(site.stdout.strip()))


@pytest.fixture(scope="module")
def radiographs(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real Hannover PNGs and one of them as a DICOM with a synthetic patient."""
    pngs = sorted((datasets / HANNOVER).glob("*.png"))[:2]
    require(len(pngs) == 2, f"Hannover radiographs not found under {datasets / HANNOVER}")
    folder = tmp_path_factory.mktemp("radiographs")
    dicom = folder / "hannover.dcm"
    pixels = np.asarray(Image.open(pngs[0]).convert("L"))
    dicom.write_bytes(
        make_dicom(
            pixels,
            StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
            SeriesInstanceUID="1.2.826.0.1.3680043.8.498.2",
            PatientName="Synthetic^Package",
        )
    )
    return [*pngs, dicom]


@pytest.mark.slow
def test_wheel_carries_model_licence_and_card(installed: Installed) -> None:
    package = installed.site / "covid_cxr"
    shipped = sorted(p.name for p in (package / "shipped").iterdir())
    assert {DEFAULT_MODEL.name, "README.md"} <= set(shipped)
    for name in shipped:  # byte for byte what the checkout has
        assert (package / "shipped" / name).read_bytes() == shipped_model(name).read_bytes()
    (dist_info,) = installed.site.glob("covid_cxr-*.dist-info")
    assert (dist_info / "licenses" / "LICENSE").read_text().startswith("MIT License")
    metadata = (dist_info / "METADATA").read_text()
    assert f"Version: {covid_cxr.__version__}" in metadata
    assert "License-Expression: MIT" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [line for line in requires if "extra ==" not in line]
    assert not [line for line in base if any(m in line for m in ("torch", "scikit", "matplot"))]
    assert any("torch" in line and 'extra == "train"' in line for line in requires)


@pytest.mark.slow
def test_installed_wheel_predicts_without_torch(
    installed: Installed, radiographs: list[Path], tmp_path: Path
) -> None:
    env = clean_env(tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import importlib.util as u, json, sys; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    found = json.loads(run([str(installed.python), "-c", probe, *TRAIN_ONLY], env=env).stdout)
    assert found == dict.fromkeys(TRAIN_ONLY, False)

    out = tmp_path / "dicom-results"
    command = [str(installed.script), "predict", *map(str, radiographs), "--format", "jsonl"]
    result = run([*command, "--dicom-out", str(out)], env=env, cwd=elsewhere, timeout=180)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3 and all(0.0 <= row["probability"] <= 1.0 for row in rows)
    # The same image as PNG and as DICOM: the same probability (up to the decoders' rounding).
    assert rows[0]["probability"] == pytest.approx(rows[2]["probability"], abs=1e-3)
    model_line = next(line for line in result.stderr.splitlines() if line.startswith("model:"))
    assert str(installed.site / "covid_cxr" / "shipped" / DEFAULT_MODEL.name) in model_line
    stems = [path.stem for path in radiographs]
    expected = {f"{stem}.{kind}.dcm" for stem in stems for kind in ("sr", "sc")}
    assert {path.name for path in out.iterdir()} == expected
    assert not (tmp_path / "home" / DEVICE_ID).exists()  # no ONNX Runtime device id

    # Training needs the [train] set: a one-line error saying so, not a traceback.
    config = REPO_ROOT / "configs" / "train" / "seed.toml"
    train = subprocess.run(
        [str(installed.script), "train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=60,
    )
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "pip install 'covid-cxr[train]'" in train.stderr


@pytest.mark.slow
def test_installed_wheel_serves_without_torch(
    installed: Installed, radiographs: list[Path], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = start_server(
        ["--threads", "1"],
        tmp_path / "server.log",
        env=clean_env(tmp_path / "home"),
        cwd=elsewhere,
        python=[str(installed.python)],
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            ready = client.get("/readyz").json()
            answer = client.post(
                "/api/v1/predict", files={"file": ("x.png", radiographs[1].read_bytes())}
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == ready["model_version"]
        assert 0.0 <= answer.json()["probability"] <= 1.0
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()
    assert not (tmp_path / "home" / DEVICE_ID).exists()


def test_shipped_models_resolve_through_importlib_resources() -> None:
    assert shipped_model(DEFAULT_MODEL.name) == DEFAULT_MODEL and DEFAULT_MODEL.is_file()
    assert SHIPPED.is_dir() and DEFAULT_MODEL.parent == SHIPPED
    assert not shipped_model("no-such-model.onnx").exists()


def test_shipped_files_resolve_from_a_zipped_package(tmp_path: Path) -> None:
    """zipimport: the file is extracted to a real path (ONNX Runtime needs one)."""
    archive = tmp_path / "covid_cxr.zip"
    card = (SHIPPED / "README.md").read_text(encoding="utf-8")
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("__init__.py", "paths.py"):
            zipped.write(REPO_ROOT / "src" / "covid_cxr" / name, f"covid_cxr/{name}")
        zipped.writestr("covid_cxr/shipped/README.md", card)
    probe = (
        "import sys; from covid_cxr import paths; p = paths.shipped_model('README.md'); "
        "print(p.is_file(), str(archive_name) in str(paths.__file__), "
        "p.read_text(encoding='utf-8') == open(sys.argv[1], encoding='utf-8').read())"
    ).replace("archive_name", repr(archive.name))
    env = {**outside_env(), "PYTHONPATH": str(archive)}
    result = run([sys.executable, "-c", probe, str(SHIPPED / "README.md")], env=env)
    assert result.stdout.split() == ["True", "True", "True"]


def test_model_card_header_states_the_weights_licence_and_metrics() -> None:
    text = (SHIPPED / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n", 2)[1])
    assert header["model_name"] == "covid-cxr-default" and header["code_license"] == "MIT"
    assert "non-commercial" in header["license_details"]
    licences = " ".join(d["license"] for d in header["datasets"])
    assert "CC BY-NC" in licences and "CC BY 3.0" in licences
    # The header describes the model actually shipped (a new model needs a new header).
    predictor = covid_cxr.Predictor()
    assert header["model_version"] == predictor.version
    point = header["operating_point"]
    assert point["name"] == predictor.operating_point
    assert point["threshold"] == pytest.approx(predictor.threshold, abs=5e-4)
    assert ("lung crop" in header["preprocessing"]) == predictor.info.preprocess.needs_lungs
    headline = header["metrics"][0]["roc_auc"]
    assert headline["ci95"][0] <= headline["value"] <= headline["ci95"][1]
    citation = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["version"] == covid_cxr.__version__ and citation["license"] == "MIT"
    assert len(citation["references"]) >= 4


CONTROL = textwrap.dedent(
    """
    import pathlib, sys, time
    import onnxruntime as ort
    ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    # Wait until strace has seen the telemetry host looked up (slower on a loaded machine),
    # giving up after the limit; the test then holds the served process at least as long.
    trace, host, start = pathlib.Path(sys.argv[3]), sys.argv[4], time.monotonic()
    while time.monotonic() - start < float(sys.argv[2]):
        if trace.is_file() and host in trace.read_text(errors="replace"):
            break
        time.sleep(0.5)
    time.sleep(2)
    """
)


def traced(trace: Path, command: list[str]) -> list[str]:
    return ["strace", "-f", "-qq", "-s", "256", "-e", "trace=network", "-o", str(trace), *command]


def stop_traced(server: RunningServer) -> None:
    """Stop the server under strace: strace holds SIGTERM while tracing, so signal the traced
    server itself; strace exits with it."""
    pid = server.process.pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        os.kill(int(child), signal.SIGTERM)
    server.stop()


@pytest.mark.slow
def test_onnx_runtime_telemetry_is_off_in_served_processes(
    radiographs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(shutil.which("strace") is not None, "strace not installed (apt-get install strace)")
    # ONNX Runtime sends no telemetry when $CI is set (as under .ci/run): both processes run
    # without it, so the control proves telemetry would happen and the fix is what stops it.
    monkeypatch.delenv("CI", raising=False)
    homes = {name: tmp_path / name for name in ("control", "serve")}
    # The control: ONNX Runtime with its default left on, traced the same way.
    control = subprocess.Popen(
        traced(
            tmp_path / "control.trace",
            [
                sys.executable,
                "-c",
                CONTROL,
                str(DEFAULT_MODEL),
                str(TELEMETRY_LIMIT_S),
                str(tmp_path / "control.trace"),
                TELEMETRY_HOST,
            ],
        ),
        env={**os.environ, **fresh_home(homes["control"]), "ORT_DISABLE_TELEMETRY": "0"},
    )
    server = start_server(
        ["--threads", "1"],
        tmp_path / "server.log",
        env=fresh_home(homes["serve"]),
        python=traced(tmp_path / "serve.trace", [sys.executable]),
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            answer = client.post(
                "/api/v1/predict", files={"file": ("x.png", radiographs[0].read_bytes())}
            )
            assert answer.status_code == 200, answer.text
            # The served process gets at least as long as the control needed, and more.
            control.wait(timeout=2 * TELEMETRY_LIMIT_S + 30)
            time.sleep(5)
    finally:
        stop_traced(server)
        control.wait(timeout=2 * TELEMETRY_LIMIT_S + 30)
    control_trace = (tmp_path / "control.trace").read_text(errors="replace")
    assert (homes["control"] / DEVICE_ID).exists(), "control wrote no device id"
    assert TELEMETRY_HOST in control_trace, "control never looked the telemetry host up"
    assert not (homes["serve"] / DEVICE_ID).exists()
    assert TELEMETRY_HOST not in (tmp_path / "serve.trace").read_text(errors="replace")
