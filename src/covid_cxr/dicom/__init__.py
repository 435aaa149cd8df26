"""DICOM results: a Structured Report with the finding and a Secondary Capture of the Grad-CAM
overlay, both filed in the input's study (or a new study for PNG/JPEG inputs)."""

from covid_cxr.dicom.results import (
    DicomResults,
    MissingUidError,
    build_results,
    result_files,
    write_results,
)

__all__ = ["DicomResults", "MissingUidError", "build_results", "result_files", "write_results"]
