"""Where shared things live: the public datasets and the shipped models.

The shipped models are package data (`covid_cxr/shipped/`), found through `importlib.resources`
so they resolve from a source checkout, an installed wheel and (extracted once per process to
a temporary file) a zipped package alike.
"""

from __future__ import annotations

import atexit
import functools
import os
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

PACKAGE_ROOT = Path(__file__).resolve().parent
# The checkout's root; only meaningful in a source checkout (configs/, ../shared/datasets).
REPO_ROOT = PACKAGE_ROOT.parents[1]
DEFAULT_MODEL_NAME = "covid-cxr-default.onnx"

if TYPE_CHECKING:  # provided by __getattr__ below
    SHIPPED: Path  # the folder of shipped models
    DEFAULT_MODEL: Path  # the model `predict` and `serve` use without --model

_extracted = ExitStack()
atexit.register(_extracted.close)


def _shipped_resources() -> Any:
    return resources.files("covid_cxr").joinpath("shipped")


@functools.cache
def shipped_model(name: str) -> Path:
    """A file shipped with the package (e.g. "covid-cxr-default.onnx") as a real file path.

    ONNX Runtime needs a file name; inside a zipped package the file is extracted once and
    removed at exit. A name that is not shipped still maps to its would-be path, so callers can
    report "does not exist" with the place it was looked for.
    """
    resource = _shipped_resources().joinpath(name)
    if isinstance(resource, Path):
        return resource.resolve()
    if not resource.is_file():
        return Path(str(resource))
    return _extracted.enter_context(resources.as_file(resource))


def __getattr__(name: str) -> Path:
    # Resolved on first use, not at import: a zipped package extracts nothing until needed.
    if name == "SHIPPED":
        shipped = _shipped_resources()
        return shipped.resolve() if isinstance(shipped, Path) else Path(str(shipped))
    if name == "DEFAULT_MODEL":
        return shipped_model(DEFAULT_MODEL_NAME)
    raise AttributeError(f"module 'covid_cxr.paths' has no attribute {name!r}")


def data_root() -> Path:
    """Folder holding the public datasets in their publishers' layouts (`COVID_CXR_DATA`)."""
    return Path(os.environ.get("COVID_CXR_DATA", REPO_ROOT.parent / "shared" / "datasets"))
