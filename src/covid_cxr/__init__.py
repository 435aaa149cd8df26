"""covid-cxr: COVID-19 detection on chest X-rays. Research use only, not a medical device."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# The one place the version is defined (pyproject reads it: `dynamic = ["version"]`).
__version__ = "0.2.0"

RESEARCH_NOTICE = "Research use only, not a medical device."

# ONNX Runtime's Linux wheels (measured: 1.32.0) start a telemetry uploader with the first
# session: a device id and an event database under ~/.cache/Microsoft/DeveloperTools/, and DNS
# lookups of mobile.events.data.microsoft.com a few seconds later. The environment variable,
# read once when ONNX Runtime initialises, is the only switch that stops all of it (its
# `disable_telemetry_events()` still writes the id and looks the host up), so it is set here,
# before any covid-cxr code can load onnxruntime; child processes inherit it. Export
# ORT_DISABLE_TELEMETRY=0 to leave ONNX Runtime's default alone (unset or empty means off).
if not os.environ.get("ORT_DISABLE_TELEMETRY"):
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__all__ = ["RESEARCH_NOTICE", "Predictor", "__version__"]

if TYPE_CHECKING:
    from covid_cxr.inference.predictor import Predictor


def __getattr__(name: str) -> Any:
    # Keep `import covid_cxr` cheap: torch and onnxruntime load only when Predictor is used.
    if name == "Predictor":
        from covid_cxr.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'covid_cxr' has no attribute {name!r}")
