"""covid-cxr: COVID-19 detection on chest X-rays. Research use only, not a medical device."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

RESEARCH_NOTICE = "Research use only, not a medical device."

__all__ = ["RESEARCH_NOTICE", "Predictor", "__version__"]

if TYPE_CHECKING:
    from covid_cxr.inference.predictor import Predictor


def __getattr__(name: str) -> Any:
    # Keep `import covid_cxr` cheap: torch and onnxruntime load only when Predictor is used.
    if name == "Predictor":
        from covid_cxr.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'covid_cxr' has no attribute {name!r}")
