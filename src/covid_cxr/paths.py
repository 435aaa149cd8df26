"""Where shared things live: the public datasets and the shipped model."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "covid-cxr-default.onnx"


def data_root() -> Path:
    """Folder holding the public datasets in their publishers' layouts (`COVID_CXR_DATA`)."""
    return Path(os.environ.get("COVID_CXR_DATA", REPO_ROOT.parent / "shared" / "datasets"))
