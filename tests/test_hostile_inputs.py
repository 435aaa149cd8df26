"""Files crafted to break the reader (issue #13): each is refused with a specific error, fast,
in bounded memory, by `read_radiograph` and by a real `covid-cxr serve` (4xx, never 500).

Every crafted file is built from a real radiograph (Hannover PNG) by tests/imaging_helpers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import config as dicom_config
from pydicom.dataset import Dataset

from covid_cxr.errors import (
    CorruptImageError,
    ImageTooLargeError,
    RadiographError,
    UnreadableFileError,
    UnsupportedImageError,
)
from covid_cxr.imaging import read_radiograph
from covid_cxr.service.settings import ServiceSettings
from imaging_helpers import (
    deflate_bomb,
    deflated,
    encode,
    make_dicom,
    patched,
    relabelled,
    zeros_after_meta,
    zeros_in_sequence,
)
from server_launcher import RunningServer, start_server
from service_helpers import service_model

HANNOVER_PNG = "covid-19-image-repository/png/262a70ca.png"
MIB = 2**20
ANSWER_WITHIN_S = 5.0
SERVER_PEAK_MIB = 600


def _lut(descriptor: list[int], table: bytes | None) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    if table is not None:
        item.add_new("LUTData", "OW", table)
    return item


def _identity(bits: int = 16) -> bytes:
    return np.arange(4096, dtype="<u2").tobytes() if bits == 16 else bytes(range(256))


@dataclass(frozen=True)
class Hostile:
    """A crafted file, what read_radiograph must raise, and words its message must hold."""

    build: Callable[[np.ndarray], bytes]
    error: type[RadiographError]
    says: str
    never_says: str = ""  # a header value that must not be echoed


def _dicom(**attributes: object) -> Callable[[np.ndarray], bytes]:
    def build(pixels: np.ndarray) -> bytes:
        return make_dicom(pixels.astype(np.uint16) * 16, bits_stored=12, **attributes)

    return build


def _centre_not_a_number(pixels: np.ndarray) -> bytes:
    data = _dicom(WindowCenter=12345, WindowWidth=800)(pixels)
    return patched(data, b"12345", b"x1y2z")


def _photometric(value: str) -> Callable[[np.ndarray], bytes]:
    def build(pixels: np.ndarray) -> bytes:
        placeholder = "MONOCHROME2"
        assert len(value) == len(placeholder)
        return patched(make_dicom(pixels), placeholder.encode(), value.encode())

    return build


HOSTILE = {
    "deflate-bomb-1GiB": Hostile(deflate_bomb, ImageTooLargeError, "inflates to more than"),
    "zeros-after-header-19MB": Hostile(
        lambda px: zeros_after_meta(make_dicom(px), 19 * MIB), CorruptImageError, "group 0000"
    ),
    "zeros-inside-a-sequence-19MB": Hostile(
        lambda px: zeros_in_sequence(make_dicom(px), 19 * MIB), CorruptImageError, "group 0000"
    ),
    "window-width-0": Hostile(
        _dicom(WindowCenter=2000, WindowWidth=0), CorruptImageError, "Window Width is 0"
    ),
    "window-width-negative": Hostile(
        _dicom(WindowCenter=2000, WindowWidth=-40), CorruptImageError, "Window Width is -40"
    ),
    "window-centre-not-a-number": Hostile(
        _centre_not_a_number, CorruptImageError, "Window Center is not a number", "x1y2z"
    ),
    "unknown-voi-lut-function": Hostile(
        _dicom(WindowCenter=2000, WindowWidth=800, VOILUTFunction="SMITHJOHN"),
        UnsupportedImageError,
        "unknown DICOM VOI LUT Function",
        "SMITHJOHN",
    ),
    "voi-lut-99-bits": Hostile(
        _dicom(VOILUTSequence=[_lut([4096, 0, 99], _identity())]),
        CorruptImageError,
        "99 bits per entry",
    ),
    "voi-lut-sequence-empty": Hostile(
        _dicom(VOILUTSequence=[]), CorruptImageError, "VOI LUT Sequence is empty or damaged"
    ),
    "voi-lut-item-empty": Hostile(
        _dicom(VOILUTSequence=[Dataset()]), CorruptImageError, "VOI LUT Sequence is empty"
    ),
    "modality-lut-short": Hostile(
        _dicom(ModalityLUTSequence=[_lut([4096, 0, 16], b"\x00\x01\x02\x03")]),
        CorruptImageError,
        "Modality LUT Sequence is empty or damaged",
    ),
    "modality-lut-sequence-empty": Hostile(
        _dicom(ModalityLUTSequence=[]), CorruptImageError, "Modality LUT Sequence is empty"
    ),
    "rescale-slope-zero": Hostile(
        _dicom(RescaleSlope=0, RescaleIntercept=0), CorruptImageError, "Rescale Slope is 0"
    ),
    "pixel-data-shorter-than-declared": Hostile(
        lambda px: make_dicom(px, Rows=3000, Columns=3000),
        CorruptImageError,
        "pixel data holds",
    ),
    "transfer-syntax-free-text": Hostile(
        lambda px: relabelled(make_dicom(px), "1.2.840.DOE.JOHN"),
        UnsupportedImageError,
        "transfer syntax (unregistered) cannot be decoded",
        "JOHN",
    ),
    "photometric-free-text": Hostile(
        _photometric("DOE^JOHN^99"),
        UnsupportedImageError,
        "photometric interpretation (an unrecognised value)",
        "DOE^JOHN",
    ),
}


@pytest.fixture(scope="module")
def hannover(datasets: Path) -> np.ndarray:
    return np.asarray(Image.open(datasets / HANNOVER_PNG).convert("L"))


@pytest.fixture(scope="module")
def crafted(hannover: np.ndarray) -> dict[str, bytes]:
    """Every HOSTILE file, built once (writing an invalid window needs validation off)."""
    mode = dicom_config.settings.writing_validation_mode
    dicom_config.settings.writing_validation_mode = dicom_config.IGNORE
    try:
        return {name: case.build(hannover) for name, case in HOSTILE.items()}
    finally:
        dicom_config.settings.writing_validation_mode = mode


# --- read_radiograph ------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE)
def test_read_radiograph_refuses_with_a_specific_error(
    name: str, crafted: dict[str, bytes]
) -> None:
    case = HOSTILE[name]
    start = time.perf_counter()
    with pytest.raises(RadiographError) as caught:
        read_radiograph(crafted[name], name=f"{name}.dcm")
    elapsed = time.perf_counter() - start
    assert type(caught.value) is case.error, caught.value
    message = str(caught.value)
    assert message.startswith(f"{name}.dcm: ") and case.says in message
    assert caught.value.hint  # what to do about it
    if case.never_says:
        assert case.never_says not in message
    assert elapsed < ANSWER_WITHIN_S


def test_never_says_is_checked_against_something(crafted: dict[str, bytes]) -> None:
    """Each value that must not be echoed really is in its crafted file."""
    for name, case in HOSTILE.items():
        assert not case.never_says or case.never_says.encode() in crafted[name]


READ_AND_MEASURE = """
import sys
from pathlib import Path
from covid_cxr.errors import ImageTooLargeError
from covid_cxr.imaging import read_radiograph
import covid_cxr.imaging.dicom  # imported before the baseline

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) / 1024

data = open(sys.argv[1], "rb").read()
Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS:")
try:
    read_radiograph(data, name="bomb.dcm", max_pixels=int(sys.argv[2]))
except ImageTooLargeError as exc:
    print(exc)
print(status("VmHWM:") - before)
"""


def test_deflate_bomb_is_refused_in_bounded_memory(
    crafted: dict[str, bytes], tmp_path: Path
) -> None:
    """1.2 MB on disk, 1 GiB inflated: the reader inflates at most 2 bytes per allowed pixel
    (plus 16 MiB), measured as the peak RSS growth of a fresh process."""
    data = crafted["deflate-bomb-1GiB"]
    assert len(data) < 2 * MIB
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", READ_AND_MEASURE, str(path), "10000000"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    message, growth = done.stdout.splitlines()
    assert "inflates to more than 35 MiB" in message
    print(f"peak RSS growth while refusing the bomb: {float(growth):.0f} MiB")
    assert float(growth) < 80


def test_deflated_dicom_within_limits_still_decodes(hannover: np.ndarray) -> None:
    plain = make_dicom(hannover)
    packed = deflated(plain)
    assert len(packed) < len(plain)
    result = read_radiograph(packed, name="deflated.dcm")
    np.testing.assert_array_equal(result.pixels, read_radiograph(plain).pixels)


def test_known_photometric_terms_are_named(hannover: np.ndarray) -> None:
    data = _photometric("YBR_PARTIAL")(hannover)  # the standard's term, so safe to echo
    data = patched(data, b"YBR_PARTIAL", b"CMYK\x20\x20\x20\x20\x20\x20\x20")
    with pytest.raises(UnsupportedImageError, match=r"interpretation \(CMYK\)"):
        read_radiograph(data)


def test_sigmoid_and_linear_exact_windows(hannover: np.ndarray) -> None:
    stored = hannover.astype(np.float64) * 16
    centre, width = float(np.median(stored)), 900.0
    for function, expected in (
        ("SIGMOID", 1 / (1 + np.exp(-4 * (stored - centre) / width))),
        ("LINEAR_EXACT", np.clip((stored - centre) / width + 0.5, 0, 1)),
    ):
        data = _dicom(WindowCenter=centre, WindowWidth=width, VOILUTFunction=function)(hannover)
        pixels = read_radiograph(data).pixels
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        np.testing.assert_allclose(pixels, expected, atol=1e-5)


def test_huge_file_is_refused_from_its_size(tmp_path: Path) -> None:
    """1 GiB of zeros named .png (a sparse file): refused by stat(), nothing read."""
    path = tmp_path / "zeros.png"
    with path.open("wb") as handle:
        handle.truncate(2**30)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"1,024\.0 MiB"):
        read_radiograph(path, max_pixels=40_000_000)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ImageTooLargeError, match=r"more than the limit of 1\.0 MiB"):
        read_radiograph(path, max_bytes=MIB)


def test_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    done: list[BaseException] = []

    def read() -> None:
        try:
            read_radiograph(fifo)
        except BaseException as exc:  # handed to the test thread
            done.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "read_radiograph blocked on a named pipe"
    assert isinstance(done[0], UnreadableFileError)
    assert "named pipe" in str(done[0])


# --- a real server --------------------------------------------------------------------------


def _peak_rss_of(pid: int) -> float:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`covid-cxr serve` with the service's default limits and 2 inference workers."""
    import psutil

    workdir = tmp_path_factory.mktemp("hostile-server")
    running = start_server(
        ["--model", str(service_model(tmp_path_factory)), "--inference-workers", "2"],
        workdir / "server.log",
        cwd=workdir,
    )
    assert not psutil.Process(running.process.pid).children()  # one process holds the model
    yield running
    running.stop()


def _post(server: RunningServer, name: str, data: bytes) -> tuple[int, dict, float]:
    start = time.perf_counter()
    response = httpx.post(
        f"{server.url}/api/v1/predict", files={"file": (name, data)}, timeout=60.0
    )
    return response.status_code, response.json(), time.perf_counter() - start


def test_server_answers_every_hostile_file_with_a_4xx_in_bounded_memory(
    server: RunningServer, crafted: dict[str, bytes], hannover: np.ndarray
) -> None:
    answers = {}
    for name, data in crafted.items():
        status, body, elapsed = _post(server, f"{name}.dcm", data)
        answers[name] = status
        assert 400 <= status < 500, (name, status, body)
        assert elapsed < ANSWER_WITHIN_S, (name, elapsed)
        if HOSTILE[name].never_says:
            assert HOSTILE[name].never_says not in str(body)
    assert answers["window-width-0"] == 422
    log = server.log_text()  # pydicom quotes invalid values in its warnings: none may leak
    assert not [
        case.never_says for case in HOSTILE.values() if case.never_says and case.never_says in log
    ]
    # A PNG whose 38 kB decode to 6300 x 6300 pixels: over the service's pixel limit.
    png_bomb = encode(Image.new("L", (6300, 6300)), "PNG")
    status, body, elapsed = _post(server, "zeros.png", png_bomb)
    assert (status, body["error"]["code"]) == (422, "image_too_large") and elapsed < ANSWER_WITHIN_S
    # The worst the limit allows: two images just under it at once (one per inference
    # worker), made from the real radiograph, plus the 1 GiB deflate bomb.
    side = int(ServiceSettings().max_pixels ** 0.5)
    large = encode(Image.fromarray(hannover).resize((side, side)), "PNG")
    results: list[tuple[int, dict, float]] = []
    threads = [
        threading.Thread(target=lambda: results.append(_post(server, "large.png", large)))
        for _ in range(2)
    ]
    threads.append(
        threading.Thread(
            target=lambda: results.append(_post(server, "bomb.dcm", crafted["deflate-bomb-1GiB"]))
        )
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(status for status, _, _ in results) == [200, 200, 422], results
    status, body, _ = _post(server, "real.png", encode(Image.fromarray(hannover), "PNG"))
    assert status == 200, body  # still serving
    peak = _peak_rss_of(server.process.pid)
    print(f"server peak RSS {peak:.0f} MiB")
    assert peak < SERVER_PEAK_MIB
