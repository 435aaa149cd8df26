"""`covid-cxr predict` over a folder of real radiographs with broken files mixed in."""

from __future__ import annotations

import csv
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.cli import main
from covid_cxr.inference.predictor import Predictor
from imaging_helpers import make_dicom, truncated
from inference_helpers import build, real_radiographs

BROKEN = {
    "truncated.jpg": "truncated",
    "notes.png": "not a png",
    "empty.png": "empty",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("efficientnet-lite0", tmp_path_factory.getbasetemp()).onnx


@pytest.fixture(scope="module")
def folder(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real PNG, JPEG and DICOM radiographs in nested folders, plus three broken files."""
    real = real_radiographs(datasets)
    root = tmp_path_factory.mktemp("scans")
    (root / "ward-a").mkdir()
    (root / "ward-b" / "dicom").mkdir(parents=True)
    for path in real["png"][:3]:
        shutil.copy(path, root / "ward-a" / path.name)
    for path in real["jpeg"][:3]:
        shutil.copy(path, root / "ward-b" / path.name)
    pixels = np.asarray(Image.open(real["png"][4]).convert("L"))
    (root / "ward-b" / "dicom" / "IM0001").write_bytes(make_dicom(pixels))  # no extension
    (root / "ward-a" / "truncated.jpg").write_bytes(truncated(real["jpeg"][5].read_bytes()))
    (root / "ward-a" / "notes.png").write_text("Patient notes, not an image.\n")
    (root / "ward-b" / "empty.png").write_bytes(b"")
    (root / "ward-b" / "README.txt").write_text("ignored by the folder walk\n")
    return root


def _good_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name not in BROKEN and p.suffix != ".txt"
    )


def test_folder_with_broken_files_predicts_the_good_ones_and_reports_the_rest(
    model: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "predictions.csv"
    code = main(
        ["predict", str(folder), "--model", str(model), "--output", str(out), "--batch-size", "3"]
    )
    err = capsys.readouterr().err
    assert code == 1  # some inputs failed
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == ["path", "probability", "label", "threshold", "model_version", "error"]
    by_name = {Path(r["path"]).name: r for r in rows}
    good = _good_files(folder)
    assert len(rows) == len(good) + len(BROKEN) == 10
    assert "README.txt" not in by_name
    # Good rows carry exactly what the Predictor says, in the order of the folder walk.
    predictor = Predictor(model)
    for path in good:
        row = by_name[path.name]
        expected = predictor.predict(path)
        assert row["error"] == ""
        assert float(row["probability"]) == pytest.approx(expected.probability, abs=1e-5)
        assert row["label"] == expected.label and float(row["threshold"]) == 0.5
        assert row["model_version"] == "test-efficientnet-lite0"
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    for name, reason in BROKEN.items():
        row = by_name[name]
        assert reason in row["error"].lower() and row["probability"] == row["label"] == ""
        assert f"{name}: " in err  # each failure is named on stderr with its reason
    assert "7 predicted, 3 failed, 1 non-image file(s) in folders ignored" in err
    assert RESEARCH_NOTICE in err  # stderr, so the CSV stays clean
    assert RESEARCH_NOTICE not in out.read_text()


def test_jsonl_and_table_outputs(
    model: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(folder), "--model", str(model), "--format", "jsonl"]) == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 10 and RESEARCH_NOTICE not in captured.out
    assert sum(r["error"] is None for r in records) == 7
    assert all(0.0 <= r["probability"] <= 1.0 for r in records if r["error"] is None)

    assert main(["predict", str(folder), "--model", str(model), "--workers", "1"]) == 1
    table = capsys.readouterr().out.splitlines()
    assert table[0] == RESEARCH_NOTICE
    assert "probability" in table[2] and "path" in table[2]
    errors = [line for line in table if "ERROR" in line]
    assert len(errors) == 3 and any("notes.png: " in line for line in errors)
    assert sum(("COVID-19" in line or "non-COVID" in line) for line in table[3:]) == 7


def test_globs_single_files_and_missing_paths(
    model: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pngs = str(folder / "**" / "*.png")
    missing = str(folder / "nope.png")
    code = main(["predict", pngs, missing, "--model", str(model), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 1
    assert rows[0]["path"] == missing and "no such file" in rows[0]["error"]
    assert {Path(r["path"]).suffix for r in rows[1:]} == {".png"}
    assert len(rows) == 1 + 3 + 2  # missing, three good PNGs, notes.png and empty.png

    one = next(iter(sorted((folder / "ward-b").glob("*.jp*g"))))
    assert main(["predict", str(one), "--model", str(model), "--format", "jsonl"]) == 0


def test_cam_overlays_at_the_radiographs_own_resolution(
    model: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cams = tmp_path / "cams"
    ward = folder / "ward-b"
    code = main(
        ["predict", str(ward), "--model", str(model), "--cam", str(cams), "--format", "jsonl"]
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # empty.png
    done = [r for r in records if r["error"] is None]
    assert len(done) == 4
    for record in done:
        overlay = Image.open(record["cam"])
        source = Image.open(record["path"]) if not record["path"].endswith("IM0001") else None
        assert overlay.mode == "RGB"
        if source is not None:
            assert overlay.size == source.size


def test_usage_errors_exit_2(
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("COVID_CXR_MODEL", raising=False)
    assert main(["predict", str(folder), "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "model not found" in capsys.readouterr().err
    monkeypatch.setenv("COVID_CXR_MODEL", str(tmp_path / "also-missing.onnx"))
    assert main(["predict", str(folder)]) == 2
    assert "$COVID_CXR_MODEL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(folder), "--batch-size", "0"])
    assert exited.value.code == 2


def test_the_installed_command_runs(model: Path, folder: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "covid_cxr.cli",
            "predict",
            str(folder / "ward-a"),
            "--model",
            str(model),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert len(list(csv.DictReader(io.StringIO(done.stdout)))) == 5
    assert "truncated.jpg: " in done.stderr


# --- interrupted runs, --resume -------------------------------------------------------------

RUN_SIZE = 48


@pytest.fixture(scope="module")
def many(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN_SIZE real radiographs (the 24 of real_radiographs, twice), enough to kill a run."""
    root = tmp_path_factory.mktemp("many")
    real = real_radiographs(datasets)
    sources = real["png"] + real["jpeg"]
    for copy in range(RUN_SIZE // len(sources)):
        for path in sources:
            shutil.copy(path, root / f"{copy}-{path.name}")
    assert len(list(root.iterdir())) == RUN_SIZE
    return root


def _command(model: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "covid_cxr.cli", "predict", str(folder), "--model", str(model),
        "--output", str(out), "--batch-size", "1", "--workers", "1", "--threads", "1", *extra,
    ]  # fmt: skip


def _kill_after_rows(command: list[str], partial: Path, rows: int) -> None:
    """Start `command`, SIGKILL it once `partial` holds `rows` complete data rows."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if partial.is_file() and partial.read_text().count("\n") >= rows + 1:  # + header
            break
        time.sleep(0.005)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _paths(out: Path) -> list[str]:
    return [row["path"] for row in csv.DictReader(out.open(encoding="utf-8"))]


def test_kill_then_resume_then_killed_rerun_keeps_the_complete_output(
    model: Path, many: Path, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    partial = tmp_path / ".predictions.csv.partial"
    expected = sorted(str(p.resolve()) for p in many.iterdir())
    # 1. The first run is killed: no output yet, its rows are in the partial file.
    _kill_after_rows(_command(model, many, out), partial, 3)
    assert not out.exists()
    done_before = len(_paths(partial))
    assert 3 <= done_before < RUN_SIZE
    # 2. --resume keeps them and predicts only the rest.
    resumed = subprocess.run(
        _command(model, many, out, "--resume"), capture_output=True, text=True, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{RUN_SIZE - done_before} predicted, 0 failed, {done_before} kept" in resumed.stderr
    assert sorted(_paths(out)) == expected  # every input exactly once
    assert not partial.exists()
    complete = out.read_bytes()
    # 3. A rerun killed 0.8 s in (the case) or after some rows leaves it intact.
    _kill_after_rows(_command(model, many, out), partial, 2)
    assert out.read_bytes() == complete
    # 4. Resuming a complete output predicts nothing and rewrites the same rows.
    again = subprocess.run(
        _command(model, many, out, "--resume"), capture_output=True, text=True, check=False
    )
    assert f"0 predicted, 0 failed, {RUN_SIZE} kept" in again.stderr
    assert sorted(_paths(out)) == expected


def test_resume_retries_failures_and_reads_jsonl(
    model: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "predictions.jsonl"
    argv = ["predict", str(folder), "--model", str(model), "--output", str(out)]
    assert main(argv) == 1
    first = [json.loads(line) for line in out.read_text().splitlines()]
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 1
    assert "0 predicted, 3 failed, 7 kept" in capsys.readouterr().err
    second = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in second) == sorted(r["path"] for r in first)
    assert [r for r in second if r["error"] is None] == [r for r in first if r["error"] is None]


def test_resume_refuses_what_it_cannot_read(
    model: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(folder), "--model", str(model), "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err
    assert main(["predict", str(folder), "--model", str(model), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    notes = tmp_path / "notes.csv"
    notes.write_text("name,comment\nscan1,fine\n")
    argv = ["predict", str(folder), "--model", str(model), "--output", str(notes), "--resume"]
    assert main(argv) == 2
    assert "cannot resume from it" in capsys.readouterr().err
    assert notes.read_text() == "name,comment\nscan1,fine\n"


# --- what a folder walk meets -----------------------------------------------------------------


def _as_nobody(work: Callable[[], int], result: Path) -> None:
    """Run `work` in a forked child with the uid/gid of `nobody` (root ignores permissions).

    A fork, not `runuser`: the interpreter lives under /root, which nobody cannot enter; the
    child inherits the already-imported modules instead.
    """
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # the child
        code = 99
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = work()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.waitstatus_to_exitcode(status) == 1, result


@pytest.fixture
def public(tmp_path: Path) -> Iterator[Path]:
    """A folder every user can enter (pytest's tmp_path is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="covid-cxr-walk-"))
    root.chmod(0o777)
    yield root
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(root)


def test_unreadable_entries_become_rows_and_the_rest_is_predicted(
    model: Path, folder: Path, public: Path
) -> None:
    scans = public / "scans"
    shutil.copytree(folder / "ward-a", scans)  # 3 good PNGs and 3 broken files
    scans.chmod(0o755)
    for name in BROKEN:
        (scans / name).unlink(missing_ok=True)
    shutil.copy(model, public / "model.onnx")
    locked = scans / "locked"  # mode 000: cannot even be listed
    locked.mkdir()
    shutil.copy(next(scans.glob("*.png")), locked / "inside.png")
    listed = scans / "listed-only"  # r--: names visible, files not reachable
    listed.mkdir()
    shutil.copy(next(scans.glob("*.png")), listed / "unreachable.png")
    secret = scans / "secret.png"
    shutil.copy(next(scans.glob("*.png")), secret)
    for path in [*scans.rglob("*.png"), public / "model.onnx"]:
        path.chmod(0o644)
    secret.chmod(0o000)
    (scans / "loop").symlink_to(scans)
    (scans / "gone.png").symlink_to(public / "deleted.png")
    os.mkfifo(scans / "pipe.png")
    locked.chmod(0o000)
    listed.chmod(0o644)
    explicit = listed / "unreachable.png"  # named on the command line too
    out = public / "out.csv"
    # nobody cannot write the tests' audit trail (a root-owned temporary folder): no trail.
    argv = ["predict", str(scans), str(explicit), "--model", str(public / "model.onnx")]
    argv.append("--no-audit")
    # As root first: imports every module the child needs (it cannot read /root's stdlib).
    assert main([*argv, "--output", str(public / "as-root.csv")]) == 1
    _as_nobody(lambda: main([*argv, "--output", str(out)]), out)
    rows = [(row["path"], row["error"]) for row in csv.DictReader(out.open(encoding="utf-8"))]
    reasons = {
        locked: "folder cannot be read (Permission denied)",
        explicit: "cannot be read (Permission denied)",
        secret: "cannot read the file (Permission denied)",
        scans / "loop": "symbolic link loop",
        scans / "gone.png": "dangling symbolic link",
        scans / "pipe.png": "not a regular file (a named pipe)",
    }
    for path, reason in reasons.items():
        found = [error for where, error in rows if where == str(path)]
        # The unreachable file is named twice: found by the walk and given as an argument.
        assert len(found) == (2 if path == explicit else 1), (path, rows)
        assert all(reason in error for error in found), (path, found)
    predicted = [where for where, error in rows if error == ""]
    assert len(predicted) == 3 and len(rows) == 3 + len(reasons) + 1


def test_huge_file_is_refused_from_its_size(model: Path, tmp_path: Path) -> None:
    """1 GiB of zeros named .png (sparse): refused by stat before a byte is read."""
    scans = tmp_path / "scans"
    scans.mkdir()
    with (scans / "zeros.png").open("wb") as handle:
        handle.truncate(2**30)
    start = time.perf_counter()
    done = subprocess.run(
        [*_command(model, scans, tmp_path / "out.jsonl"), "--max-file-mb", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "the file is 1,024.0 MiB, more than the limit of 20.0 MiB" in row["error"]
    print(f"1 GiB file refused in {time.perf_counter() - start:.1f} s (incl. model load)")
