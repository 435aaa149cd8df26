"""Make this folder's example: DICOM results of a real radiograph, dumped as text and PNG.

The input is Hannover Medical School's covid-19-image-repository image 006f3a8a.png (CC BY 3.0,
https://github.com/ml-workgroup/covid-19-image-repository), wrapped in a DX DICOM with a
synthetic patient and new UIDs. It then runs `covid-cxr predict --dicom-out` and writes
sr.txt, sc.txt (key attributes, the SR's content tree) and sc.png (the Secondary Capture's
pixels). Run from the repository root:

    COVID_CXR_DATA=../shared/datasets python docs/results/dicom-results/make_example.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covid_cxr.paths import data_root

HERE = Path(__file__).resolve().parent
SOURCE = "covid-19-image-repository/png/006f3a8a.png"
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
SR_KEYS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "Modality", "SeriesDescription", "ContentQualification", "CompletionFlag",
    "VerificationFlag", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime",
)  # fmt: skip
SC_KEYS = (
    *SR_KEYS[:8], "ConversionType", "ImageType", "BurnedInAnnotation", "ImageComments",
    "DerivationDescription", "PhotometricInterpretation", "Rows", "Columns",
    "PatientOrientation", *SR_KEYS[10:],
)  # fmt: skip


def input_dicom(path: Path) -> Dataset:
    pixels = np.asarray(Image.open(data_root() / SOURCE).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientOrientation = "DX", ["L", "F"]
    ds.PatientName, ds.PatientID = "Synthetic^Example", "SYNTHETIC-0001"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20200401", "101500", "", ""
    ds.ReferringPhysicianName = ""
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)
    return ds


def attributes(ds: Dataset, keys: tuple[str, ...]) -> list[str]:
    return [f"{key:28} {ds.get(key, '(absent)')}" for key in keys]


def content_tree(items: Dataset, depth: int = 0) -> list[str]:
    lines = []
    for item in items:
        name = item.ConceptNameCodeSequence[0]
        if item.ValueType == "TEXT" or item.ValueType == "UIDREF":
            value = item.get("TextValue", item.get("UID"))
        elif item.ValueType == "NUM":
            measured = item.MeasuredValueSequence[0]
            value = (
                f"{measured.NumericValue} [{measured.MeasurementUnitsCodeSequence[0].CodeValue}]"
            )
        elif item.ValueType == "CODE":
            code = item.ConceptCodeSequence[0]
            value = f"({code.CodeValue}, {code.CodingSchemeDesignator}) {code.CodeMeaning}"
        elif item.ValueType == "IMAGE":
            value = f"SOP Instance {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}"
        else:
            value = ""
        relation = item.get("RelationshipType", "ROOT")
        label = f"({name.CodeValue}, {name.CodingSchemeDesignator}) {name.CodeMeaning}"
        lines.append(f"{'  ' * depth}{relation} {item.ValueType} {label}: {value}".rstrip(": "))
        lines += content_tree(item.get("ContentSequence", []), depth + 1)
    return lines


def evidence(sr: Dataset) -> list[str]:
    lines = []
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for instance in series.ReferencedSOPSequence:
                lines.append(
                    f"  study {study.StudyInstanceUID} series {series.SeriesInstanceUID} "
                    f"instance {instance.ReferencedSOPInstanceUID}"
                )
    return lines


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source_path = Path(tmp) / "example.dcm"
        source = input_dicom(source_path)
        command = [sys.executable, "-m", "covid_cxr.cli", "predict", str(source_path)]
        subprocess.run([*command, "--dicom-out", tmp], check=True)
        sr = pydicom.dcmread(Path(tmp) / "example.sr.dcm")
        sc = pydicom.dcmread(Path(tmp) / "example.sc.dcm")
    header = [
        "Input (synthetic DX DICOM of Hannover covid-19-image-repository 006f3a8a.png, CC BY 3.0):",
        *attributes(source, ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")),
        "",
    ]
    sr_text = [
        *header,
        "Structured Report (`covid-cxr predict example.dcm --dicom-out DIR` -> example.sr.dcm):",
        *attributes(sr, SR_KEYS),
        "Current requested procedure evidence:",
        *evidence(sr),
        "",
        "Content tree (TID 1500):",
        *content_tree(sr.ContentSequence),
    ]
    sc_text = [
        *header,
        "Secondary Capture (example.sc.dcm):",
        *attributes(sc, SC_KEYS),
        f"{'SourceImageSequence':28} {sc.SourceImageSequence[0].ReferencedSOPInstanceUID}",
    ]
    (HERE / "sr.txt").write_text("\n".join(sr_text) + "\n", encoding="utf-8")
    (HERE / "sc.txt").write_text("\n".join(sc_text) + "\n", encoding="utf-8")
    Image.fromarray(sc.pixel_array).save(HERE / "sc.png", optimize=True)


if __name__ == "__main__":
    main()
