"""The page in a real Chromium: a picture that is not a chest radiograph gets the input gate's
message and no result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect

from covid_cxr.gate import oos
from test_browser import ARTIFACTS, browser, server, session  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_a_non_radiograph_gets_the_out_of_scope_message(session, tmp_path: Path) -> None:  # noqa: F811
    letter = tmp_path / "letter.png"
    oos.document(np.random.default_rng(5)).save(letter)
    s = session()
    s.open()
    page = s.page
    page.set_input_files("#file", str(letter))
    message = page.locator("#message")
    expect(message).to_contain_text("letter.png: out of scope: not a frontal chest radiograph")
    assert "What to do: upload a frontal (PA or AP) chest radiograph" in message.inner_text()
    assert "No result" in page.inner_text("#status")
    assert page.is_hidden("#result") and page.is_hidden("#viewer")
    page.screenshot(path=str(ARTIFACTS / "web-out-of-scope.png"))
    assert s.problems == []
