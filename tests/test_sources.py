"""Source readers against the real public layouts, label mapping, user CSV/folder readers and
the manifest API (no image decoding here: that is test_build.py)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from covid_cxr.data import sources
from covid_cxr.data.labels import finding_label, normalise_label
from covid_cxr.data.manifest import ManifestRow, load_labelled, load_manifest, write_manifest
from covid_cxr.data.sources import open_source
from covid_cxr.errors import DataError


def _read(datasets: Path, kind: str, folder: str) -> sources.SourceResult:
    return open_source(kind, datasets / folder).read()


def _by_name(result: sources.SourceResult) -> dict[str, sources.Record]:
    return {record.path.name: record for record in result.records}


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("covid", "COVID"),
        ("COVID-19", "COVID"),
        (" Positive ", "COVID"),
        ("normal", "Normal"),
        ("No Finding", "Normal"),
        ("No_Finding", "Normal"),
        ("NEGATIVE", "Normal"),
        ("PNEUMONIA", "Pneumonia"),
        ("Streptococcus", "Streptococcus"),
        ("  ", ""),
    ],
)
def test_normalise_label(text: str, label: str) -> None:
    assert normalise_label(text) == label


@pytest.mark.parametrize(
    ("finding", "label"),
    [
        ("COVID-19", "COVID"),
        ("COVID-19, ARDS", "COVID"),
        ("Pneumonia/Viral/COVID-19", "COVID"),
        ("Pneumonia/Viral/SARS", "SARS"),
        ("No Finding", "Normal"),
        ("SARS", "SARS"),
    ],
)
def test_finding_label(finding: str, label: str) -> None:
    assert finding_label(finding) == label


# ---------------------------------------------------------------- public layouts (real data)


def test_ieee8023_keeps_frontal_xrays_and_reports_the_rest(datasets: Path) -> None:
    result = _read(datasets, "ieee8023", "covid-chestxray-dataset")
    excluded = Counter(item.kind for item in result.excluded)
    # June-2020 snapshot: 673 rows = 84 CT + 47 lateral + 11 frontal rows without image + 531.
    assert excluded == {sources.CT: 84, sources.LATERAL: 47, sources.MISSING: 11}
    assert len(result.records) == 531
    assert all(record.view.startswith(("PA", "AP")) for record in result.records)
    assert all(record.path.is_file() for record in result.records)
    assert all(record.patient_id.startswith("ieee8023:") for record in result.records)
    labels = Counter(record.label for record in result.records)
    assert labels["COVID"] == 427
    assert labels["Normal"] == 19
    assert labels["SARS"] == 16
    missing = [item.item for item in result.excluded if item.kind == sources.MISSING]
    assert "metadata.csv row 55: images/covid-19-pneumonia-14-PA.png" in missing
    # Images it re-published from the Hannover archive carry a provenance link.
    linked = [record for record in result.records if record.links]
    assert len(linked) == 92
    assert all(record.links == (f"hannover-image:{record.path.stem}",) for record in linked)


def test_kaggle_patient_ids_from_the_three_file_name_patterns(datasets: Path) -> None:
    result = _read(datasets, "kaggle-pneumonia", "chest_xray")
    assert len(result.records) == 5856
    assert Counter(r.label for r in result.records) == {"Pneumonia": 4273, "Normal": 1583}
    assert not result.notes  # every file name gave a patient id
    records = _by_name(result)
    assert records["person90_bacteria_443.jpeg"].patient_id == "kermany:person90"
    assert records["person447_virus_921_1.jpeg"].patient_id == "kermany:person447"
    assert records["IM-0432-0001.jpeg"].patient_id == "kermany:IM-0432"
    assert records["IM-0429-0001-0001.jpeg"].patient_id == "kermany:IM-0429"
    assert records["NORMAL2-IM-1236-0001.jpeg"].patient_id == "kermany:NORMAL2-IM-1236"
    assert records["person90_bacteria_443.jpeg"].finding == "Pneumonia/Bacterial"
    # One child's bacterial and viral images are one patient.
    kinds_per_person = {}
    for record in result.records:
        kinds_per_person.setdefault(record.patient_id, set()).add(record.finding)
    assert any(len(kinds) == 2 for kinds in kinds_per_person.values())


def test_kaggle_normal_196_shares_the_kaggle_patient_namespace(datasets: Path) -> None:
    small = _read(datasets, "kaggle-pneumonia", "chest_xray")
    full = _read(datasets, "kaggle-pneumonia", "kaggle-normal-196")
    assert len(full.records) == 196
    assert {r.label for r in full.records} == {"Normal"}
    assert {r.source for r in full.records} == {"kaggle-normal-196"}
    patients = {r.path.name: r.patient_id for r in small.records}
    assert all(patients[r.path.name] == r.patient_id for r in full.records)


def test_nih_patient_from_file_name_and_label_from_folder(datasets: Path) -> None:
    result = _read(datasets, "nih", "nih-chestxray8-subset")
    assert Counter(r.label for r in result.records) == {"Normal": 400, "Pneumonia": 100}
    records = _by_name(result)
    assert records["00001250_006.png"].patient_id == "nih:00001250"
    assert records["00001250_006.png"].label == "Pneumonia"
    assert not result.notes and not result.excluded


def test_hannover_all_covid_with_patient_and_projection(datasets: Path) -> None:
    result = _read(datasets, "hannover", "covid-19-image-repository")
    assert len(result.records) == 243
    assert {r.label for r in result.records} == {"COVID"}
    assert len({r.patient_id for r in result.records}) == 71
    assert {r.view for r in result.records} == {"AP", "PA"}
    assert all(r.path.name == f"{r.links[0].split(':')[1]}.png" for r in result.records)


def test_jsrt_adult_non_covid_one_patient_per_image(datasets: Path) -> None:
    result = _read(datasets, "jsrt", "jsrt")
    assert Counter(r.label for r in result.records) == {"Lung nodule": 154, "Normal": 93}
    assert len({r.patient_id for r in result.records}) == 247
    record = _by_name(result)["JPCLN009.png"]
    assert (record.patient_id, record.view, record.finding) == (
        "jsrt:JPCLN009",
        "PA",
        "lung nodule",
    )
    assert not result.notes and not result.excluded


def test_openist_normals_without_patient_ids_are_noted(datasets: Path) -> None:
    result = _read(datasets, "openist-normal", "openist-normal")
    assert len(result.records) == 275 and {r.label for r in result.records} == {"Normal"}
    assert all(r.patient_id.startswith("openist:file:images/") for r in result.records)
    assert "275 image(s) without a patient id" in result.notes[0]


def test_masked_collection_reports_images_no_row_describes(datasets: Path, tmp_path: Path) -> None:
    copy = tmp_path / "jsrt"
    shutil.copytree(datasets / "jsrt", copy)
    (copy / "metadata.csv").write_text(
        "image,mask,patient_id,finding\nimages/JPCLN009.png,masks/JPCLN009.png,JPCLN009,no nodule\n"
    )
    result = open_source("jsrt", copy).read()
    assert [r.label for r in result.records] == ["Normal"]
    assert len(result.excluded) == 246
    assert {e.kind for e in result.excluded} == {sources.NO_METADATA}


def test_unknown_kind_and_missing_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown source kind 'dicomdir'.*ieee8023"):
        open_source("dicomdir", tmp_path)
    with pytest.raises(DataError, match="nowhere: ieee8023 source not found"):
        open_source("ieee8023", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"metadata\.csv: ieee8023 metadata\.csv not found"):
        open_source("ieee8023", tmp_path).read()


# ---------------------------------------------------------------- user data


def _user_folder(datasets: Path, root: Path) -> Path:
    normals = sorted((datasets / "kaggle-normal-196" / "NORMAL").iterdir())[:2]
    covid = sorted((datasets / "covid-19-image-repository" / "png").iterdir())[:2]
    for label, files in (("Covid-19", covid), ("normal", normals)):
        (root / label).mkdir(parents=True)
        for file in files:
            shutil.copy(file, root / label / file.name)
    (root / "normal" / ".DS_Store").write_bytes(b"\0")
    return root


def test_labelled_folder(datasets: Path, tmp_path: Path) -> None:
    root = _user_folder(datasets, tmp_path / "hospital")
    result = open_source("folder", root).read()
    assert Counter(r.label for r in result.records) == {"COVID": 2, "Normal": 2}
    assert {r.source for r in result.records} == {"hospital"}
    assert len({r.patient_id for r in result.records}) == 4  # one id per file...
    assert "4 image(s) without a patient id" in result.notes[0]  # ...and the report says so
    assert [(e.item, e.kind) for e in result.excluded] == [("normal/.DS_Store", sources.HIDDEN)]


def test_labelled_csv(datasets: Path, tmp_path: Path) -> None:
    root = _user_folder(datasets, tmp_path / "hospital")
    covid = sorted((root / "Covid-19").iterdir())
    normal = sorted(p for p in (root / "normal").iterdir() if p.suffix == ".jpeg")
    table = root / "labels.csv"
    table.write_text(
        "path,label,patient_id\n"
        f"Covid-19/{covid[0].name},positive,p1\n"
        f"{covid[1]},COVID,p1\n"
        f"normal/{normal[0].name},negative,\n"
        "normal/gone.png,normal,p3\n"
        f"normal/{normal[1].name},,p4\n"
    )
    result = open_source("csv", table).read()
    assert [(r.label, r.patient_id) for r in result.records] == [
        ("COVID", "labels:p1"),
        ("COVID", "labels:p1"),
        ("Normal", f"labels:file:normal/{normal[0].name}"),
    ]
    kinds = Counter(e.kind for e in result.excluded)
    assert kinds == {sources.MISSING: 1, sources.NO_LABEL: 1}
    assert "1 image(s) without a patient id" in result.notes[0]


def test_labelled_csv_needs_path_and_label_columns(tmp_path: Path) -> None:
    table = tmp_path / "cases.csv"
    table.write_text("file,diagnosis\na.png,covid\n")
    with pytest.raises(DataError, match=r"cases\.csv: column\(s\) path, label missing"):
        open_source("csv", table).read()


# ---------------------------------------------------------------- manifest API


def _rows(datasets: Path) -> list[ManifestRow]:
    files = sorted((datasets / "nih-chestxray8-subset" / "No_Finding").iterdir())[:3]
    return [
        ManifestRow(path, label, "nih", f"nih:{i}", "", "ab" * 32, split)
        for i, (path, label, split) in enumerate(
            zip(files, ("COVID", "Normal", "Pneumonia"), ("train", "val", "external"), strict=True)
        )
    ]


def test_manifest_round_trip_with_portable_paths(datasets: Path, tmp_path: Path) -> None:
    rows = _rows(datasets)
    manifest = write_manifest(tmp_path / "m.csv", rows, root=datasets)
    text = manifest.read_text()
    assert str(datasets) not in text  # stored relative to the data root
    assert "nih-chestxray8-subset/No_Finding/" in text
    assert load_manifest(manifest, root=datasets) == rows
    assert [row.target for row in rows] == [1, 0, 0]
    # On another machine the same manifest resolves against that machine's data root.
    moved = tmp_path / "elsewhere"
    assert load_manifest(manifest, root=moved)[0].path == moved / rows[0].path.relative_to(datasets)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("path,label,source,patient_id,view,sha256,split\n", "header but no rows"),
        ("path,label,source,patient_id,view,split\na.png,COVID,s,p,,train\n", "sha256 missing"),
        ("path,label,source,patient_id,view,sha256,split\na.png,COVID,s,p,,x,training\n", "line 2"),
        ("path,label,source,patient_id,view,sha256,split\n,COVID,s,p,,x,train\n", "path is empty"),
    ],
)
def test_load_manifest_refuses_bad_files(tmp_path: Path, content: str, message: str) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_manifest(manifest)
    assert str(manifest) in str(error.value)


def test_load_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.csv: a manifest not found"):
        load_manifest(tmp_path / "manifest.csv")


def test_load_labelled_accepts_folder_csv_and_manifest(datasets: Path, tmp_path: Path) -> None:
    root = _user_folder(datasets, tmp_path / "hospital")
    folder_rows = load_labelled(root)
    assert len(folder_rows) == 4 and {r.split for r in folder_rows} == {"external"}
    assert all(len(r.sha256) == 64 and r.path.is_absolute() for r in folder_rows)
    assert [e.kind for e in folder_rows.excluded] == [sources.HIDDEN]
    table = root / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{r.path},{r.label}\n" for r in folder_rows))
    assert [(r.path, r.label) for r in load_labelled(table)] == [
        (r.path, r.label) for r in folder_rows
    ]
    manifest = write_manifest(tmp_path / "manifest.csv", _rows(datasets), root=datasets)
    assert len(load_labelled(manifest)) == 3
    with pytest.raises(DataError, match="no such file or folder"):
        load_labelled(tmp_path / "nothing")
