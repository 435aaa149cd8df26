"""Where shared things live: the public datasets and the shipped models.

The shipped models are package data (`covid_cxr/shipped/`), so they travel inside the wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parents[1]
SHIPPED = PACKAGE_ROOT / "shipped"
DEFAULT_MODEL = SHIPPED / "covid-cxr-default.onnx"


def shipped_model(name: str) -> Path:
    """A model file shipped with the package, e.g. "covid-cxr-default.onnx"."""
    return SHIPPED / name


def data_root() -> Path:
    """Folder holding the public datasets in their publishers' layouts (`COVID_CXR_DATA`)."""
    return Path(os.environ.get("COVID_CXR_DATA", REPO_ROOT.parent / "shared" / "datasets"))
