"""Shared fixtures. Real data comes from COVID_CXR_DATA (default ../shared/datasets).

Without it, tests that need it skip with the reason; under CI (CI=true) they fail instead,
because a CI run that silently skipped the real-data tests would prove nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from covid_cxr.paths import data_root

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (under CI) when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing prerequisites are failures, not skips)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The folder of real public radiographs."""
    root = data_root()
    require(
        (root / "README.md").is_file(),
        f"real datasets not found at {root}; set COVID_CXR_DATA to the shared datasets folder",
    )
    return root


@pytest.fixture(scope="session", autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every `covid-cxr predict`/`serve` a test runs records its audit trail under a temporary
    state folder (the default trail), never in the user's own ~/.local/state."""
    home = tmp_path_factory.mktemp("state-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(home))
        patch.delenv("COVID_CXR_AUDIT_DB", raising=False)
        yield home
