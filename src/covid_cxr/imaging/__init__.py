"""Reading radiographs of any format and the one preprocessing function."""

from covid_cxr.imaging.preprocess import PreprocessConfig, preprocess
from covid_cxr.imaging.read import Radiograph, read_radiograph

__all__ = ["PreprocessConfig", "Radiograph", "preprocess", "read_radiograph"]
