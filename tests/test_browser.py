"""The web page in a real headless Chromium (Debian's), driven by Playwright, against the real
server: upload a real radiograph, see the result and the heat map, at desktop and phone size,
from the keyboard, with no request leaving the server's origin.

Screenshots land in test-artifacts/ (web-desktop.png, web-phone.png, web-error.png).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from conftest import require
from covid_cxr import RESEARCH_NOTICE
from imaging_helpers import make_dicom, truncated
from service_helpers import API_KEY, Server, real_jpeg, shared_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 30_000


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Server:
    return shared_server(request)


@pytest.fixture(scope="module")
def browser():
    require(Path(CHROMIUM).is_file(), f"{CHROMIUM} missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Session:
    """A fresh browser context on the page, recording every request and CSP complaint."""

    def __init__(self, browser, server: Server, viewport: dict, with_key: bool) -> None:
        self.server = server
        self.context = browser.new_context(viewport=viewport)
        self.context.set_default_timeout(TIMEOUT_MS)
        if with_key:
            self.context.add_init_script(
                f"sessionStorage.setItem('covid-cxr-api-key', '{API_KEY}')"
            )
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.context.new_page()
        self.page.on(
            "console",
            lambda m: self.problems.append(m.text) if "Content Security Policy" in m.text else None,
        )
        self.page.on("pageerror", lambda exc: self.problems.append(str(exc)))

    def open(self, path: str = "/") -> None:
        self.page.goto(self.server.url + path)

    def foreign_requests(self) -> list[str]:
        own = (self.server.url + "/", "data:", "blob:")
        return [url for url in self.requests if not url.startswith(own)]

    def image_src(self) -> str:
        return self.page.get_attribute("#image", "src") or ""

    def natural_size(self) -> tuple[int, int]:
        return tuple(self.page.eval_on_selector("#image", "i => [i.naturalWidth, i.naturalHeight]"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(browser, server: Server) -> Iterator[Session]:
    created: list[Session] = []

    def make(viewport: dict = DESKTOP, with_key: bool = True) -> Session:
        created.append(Session(browser, server, viewport, with_key))
        return created[-1]

    yield make
    for one in created:
        one.close()


@pytest.fixture(scope="module")
def jpeg(datasets: Path) -> Path:
    return real_jpeg(datasets)


def test_upload_shows_result_and_heatmap(session, jpeg: Path) -> None:
    s = session(with_key=False)
    s.open()
    page = s.page
    # The server has an API key: the page asks for it, then works.
    page.wait_for_selector("#key-form", state="visible")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button")
    expect(page.locator("#model-info")).to_contain_text("threshold")

    page.set_input_files("#file", str(jpeg))
    page.wait_for_selector("#result", state="visible")
    verdict = page.inner_text("#verdict")
    assert verdict in ("COVID-19 likely", "COVID-19 unlikely")
    assert "Probability of COVID-19" in page.inner_text("#probability")
    assert verdict in page.inner_text("#status")  # announced through aria-live
    assert page.get_attribute("#status", "aria-live") == "polite"
    fill = page.eval_on_selector("#bar-fill", "e => e.style.width")
    marker = page.eval_on_selector("#bar-marker", "e => e.style.left")
    assert fill.endswith("%") and marker.endswith("%")

    # The heat map is shown at the radiograph's own size, and the toggle switches it off and on.
    assert s.image_src().startswith("data:image/png;base64,")
    with Image.open(jpeg) as original:
        assert s.natural_size() == original.size
    page.screenshot(path=str(ARTIFACTS / "web-desktop.png"), full_page=True)
    page.click("#heatmap")
    assert s.image_src().startswith("blob:")
    page.click("#heatmap")
    assert s.image_src().startswith("data:image/png")

    assert page.is_visible("#notice")
    assert RESEARCH_NOTICE in page.inner_text("#notice")
    assert RESEARCH_NOTICE in page.inner_text("#result")
    assert s.foreign_requests() == []
    assert s.problems == []


def test_wrong_files_get_clear_messages(session, jpeg: Path, tmp_path: Path) -> None:
    s = session()
    s.open()
    page = s.page
    text = tmp_path / "notes.png"
    text.write_text("this is not a radiograph\n" * 10)
    page.set_input_files("#file", str(text))
    page.wait_for_selector("#message", state="visible")
    assert "“notes.png” is not a PNG, JPEG or DICOM image" in page.inner_text("#message")
    assert not any("/api/v1/predict" in url for url in s.requests)  # refused before sending

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(truncated(jpeg.read_bytes()))
    page.set_input_files("#file", str(cut))
    # The server's own JSON message, naming the file.
    expect(page.locator("#message")).to_contain_text("cut.jpg:")
    assert page.is_hidden("#result") and page.is_hidden("#viewer")
    assert "What to do:" in page.inner_text("#message")
    assert "No result" in page.inner_text("#status")
    page.screenshot(path=str(ARTIFACTS / "web-error.png"))
    assert s.problems == []


def test_dicom_shows_the_server_rendered_preview(session, jpeg: Path, tmp_path: Path) -> None:
    pixels = np.asarray(Image.open(jpeg).convert("L"))
    path = tmp_path / "study.dcm"
    path.write_bytes(make_dicom(pixels))
    s = session()
    s.open()
    s.page.set_input_files("#file", str(path))
    s.page.wait_for_selector("#result", state="visible")
    s.page.click("#heatmap")  # off: the plain radiograph, which only the server could decode
    assert s.image_src().startswith("data:image/png")
    assert s.natural_size() == (pixels.shape[1], pixels.shape[0])
    assert "DICOM" in s.page.inner_text("#fact-image")


def test_drop_a_file_on_the_zone(session, jpeg: Path) -> None:
    s = session()
    s.open()
    payload = base64.b64encode(jpeg.read_bytes()).decode()
    transfer = s.page.evaluate_handle(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
            return transfer;
        }""",
        payload,
    )
    s.page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    s.page.wait_for_selector("#result", state="visible")
    assert s.page.inner_text("#fact-file") == "dropped.jpg"


def test_phone_size_and_keyboard_only(session, jpeg: Path) -> None:
    s = session(viewport=PHONE)
    page = s.page
    # Playwright turns on file-chooser interception without waiting for it; a listener set
    # now makes sure it is on before the key press below.
    page.on("filechooser", lambda _chooser: None)
    s.open()
    expect(page.locator("#model-info")).to_contain_text("threshold")
    page.keyboard.press("Tab")
    # The focus lands on the file input inside the drop zone, which draws the focus ring.
    assert page.evaluate("document.activeElement.id") == "file"
    outline = page.eval_on_selector("#dropzone", "e => getComputedStyle(e).outlineStyle")
    assert outline != "none"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(jpeg))
    page.wait_for_selector("#result", state="visible")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "heatmap"
    page.keyboard.press("Space")
    assert s.image_src().startswith("blob:")
    page.keyboard.press("Space")

    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"horizontal scroll at phone size: {widths}"
    box = page.locator("#image").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert page.is_visible("#notice")
    page.screenshot(path=str(ARTIFACTS / "web-phone.png"), full_page=True)
    assert s.foreign_requests() == []
    assert s.problems == []


def test_api_docs_render_offline(session) -> None:
    s = session()
    s.open("/docs")
    s.page.wait_for_selector(".swagger-ui .info .title")
    assert "covid-cxr" in s.page.inner_text(".swagger-ui .info .title")
    paths = s.page.locator(".opblock-summary-path")
    expect(paths.filter(has_text="/api/v1/predict/batch")).to_have_count(1)
    assert s.foreign_requests() == []
    assert s.problems == []
