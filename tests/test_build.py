"""`covid-cxr data build` on the real datasets: the split is leak-free, counts are as documented.

The default build decodes every image once (~7,300) and is shared by the tests of this module;
later builds reuse its per-sha256 cache, which lives in this session's tmp folder only.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from covid_cxr.cli import main
from covid_cxr.config import DataRecipe, SourceSpec, load_config
from covid_cxr.data import sources
from covid_cxr.data.build import BuildResult, build_dataset
from covid_cxr.data.fingerprint import CACHE_NAME
from covid_cxr.data.manifest import ManifestRow, load_manifest
from covid_cxr.data.report import write_outputs

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-build")


def _build(recipe: DataRecipe, datasets: Path, build_dir: Path) -> BuildResult:
    return build_dataset(
        recipe,
        data_root=datasets,
        workers=2,
        cache_file=build_dir / CACHE_NAME,
        progress=False,
    )


@pytest.fixture(scope="session")
def default_build(datasets: Path, build_dir: Path) -> tuple[BuildResult, list[ManifestRow]]:
    result = _build(load_config(RECIPES / "default.toml", DataRecipe), datasets, build_dir)
    paths = write_outputs(result, build_dir / "default")
    return result, load_manifest(paths["manifest"], root=datasets)


@pytest.fixture(scope="session")
def seed_recipe() -> DataRecipe:
    return load_config(RECIPES / "seed.toml", DataRecipe)


def _splits_by(rows: list[ManifestRow], key: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        found[getattr(row, key)].add(row.split)
    return found


def test_default_build_no_patient_or_file_in_two_splits(default_build) -> None:
    _, rows = default_build
    assert len(rows) > 6500
    assert all(len(splits) == 1 for splits in _splits_by(rows, "patient_id").values())
    assert all(len(splits) == 1 for splits in _splits_by(rows, "sha256").values())


def test_default_build_near_duplicates_and_linked_images_never_straddle(default_build) -> None:
    result, rows = default_build
    by_patient = _splits_by(rows, "patient_id")
    tied = [pair["patients"] for pair in result.near_duplicate_pairs]
    tied += list(result.provenance_links.values())
    assert len(result.near_duplicate_pairs) > 250  # not vacuous: 196 Kaggle + ieee8023 copies
    assert len(result.provenance_links) >= 80  # ieee8023 copies of Hannover images
    for patients in tied:
        splits = set().union(*(by_patient.get(patient, set()) for patient in patients))
        assert len(splits) <= 1, (patients, splits)


def test_default_build_counts_and_exclusions(default_build) -> None:
    result, rows = default_build
    sources_present = {row.source for row in rows}
    assert sources_present == {
        "hannover",
        "ieee8023",
        "kaggle-pneumonia",
        "nih",
        "jsrt",
        "openist-normal",
    }
    assert Counter(row.label for row in rows if row.source == "nih") == {
        "Normal": 399,  # one of the 400 is a byte-identical copy of another
        "Pneumonia": 100,
    }
    new_adults = ("jsrt", "openist-normal")
    assert Counter((r.source, r.label) for r in rows if r.source in new_adults) == {
        ("jsrt", "Lung nodule"): 153,  # two near-duplicate pairs (pHash distance 2) dropped
        ("jsrt", "Normal"): 92,
        ("openist-normal", "Normal"): 273,  # a near-duplicate pair and a byte-identical copy
    }
    share = Counter(row.split for row in rows)
    for name, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(share[name] / len(rows) - ratio) < 0.01
    excluded = Counter(item.kind for item in result.excluded)
    assert excluded[sources.CT] == 84
    assert excluded[sources.LATERAL] == 47
    assert excluded[sources.MISSING] == 11
    assert excluded[sources.UNREADABLE] == 0  # every shared image decodes
    assert excluded[sources.DUPLICATE] == result.duplicates["exact_duplicate_files_excluded"] > 30
    near = Counter(e.source for e in result.excluded if e.kind == sources.NEAR_DUPLICATE)
    assert near["kaggle-normal-196"] >= 190  # full-size copies of chest_xray normals
    assert near["ieee8023"] >= 80  # re-published Hannover images


def test_default_manifest_stores_paths_relative_to_the_data_root(
    default_build, datasets: Path, build_dir: Path
) -> None:
    text = (build_dir / "default" / "manifest.csv").read_text()
    assert str(datasets) not in text
    assert "\nkaggle-normal-196/" not in text  # dropped as copies
    assert "\nchest_xray/" in text
    report = (build_dir / "default" / "report.md").read_text()
    assert "| kaggle-pneumonia | Pneumonia |" in report
    assert "lateral view" in report


def test_seed_recipe_gives_196_plus_196_split_75_25_by_patient(
    seed_recipe: DataRecipe, datasets: Path, build_dir: Path, default_build
) -> None:
    result = _build(seed_recipe, datasets, build_dir)
    assert result.decoded == 0  # every image already hashed by the default build
    rows = result.rows
    assert Counter((r.source, r.label) for r in rows) == {
        ("ieee8023", "COVID"): 196,
        ("kaggle-normal-196", "Normal"): 196,
    }
    assert {r.view for r in rows if r.label == "COVID"} == {"PA"}
    splits = Counter((r.split, r.label) for r in rows)
    assert set(r.split for r in rows) == {"train", "val"}
    assert abs(splits["train", "COVID"] - 147) <= 3 and abs(splits["train", "Normal"] - 147) <= 3
    assert all(len(s) == 1 for s in _splits_by(rows, "patient_id").values())
    # Near-duplicate copies are kept in this recipe ("group"): both copies in one split.
    split_of = {r.path: r.split for r in rows}
    pairs = result.near_duplicate_pairs
    assert pairs
    for pair in pairs:
        a, b = (datasets / pair[key] for key in ("a", "b"))
        assert split_of[a] == split_of[b]


@pytest.mark.parametrize("balance", ["overall", "per-split"])
def test_class_balancing(seed_recipe: DataRecipe, datasets: Path, build_dir: Path, balance) -> None:
    covid = dataclasses.replace(seed_recipe.sources[0], limit=0)  # 216 COVID PA vs 196 normals
    recipe = dataclasses.replace(
        seed_recipe, sources=[covid, seed_recipe.sources[1]], balance=balance
    )
    result = _build(recipe, datasets, build_dir)
    per_split = Counter((row.split, row.target) for row in result.rows)
    if balance == "overall":
        assert Counter(row.target for row in result.rows) == {1: 196, 0: 196}
    for split in ("train", "val"):
        if balance == "per-split":
            assert per_split[split, 1] == per_split[split, 0]
    assert any(e.kind == sources.BALANCING for e in result.excluded)


def test_held_out_source_goes_to_external_with_its_copies_excluded(
    datasets: Path, build_dir: Path, default_build
) -> None:
    recipe = DataRecipe(
        name="leave-hannover-out",
        sources=[
            SourceSpec("ieee8023", "covid-chestxray-dataset", "ieee8023"),
            SourceSpec("hannover", "covid-19-image-repository", "hannover", holdout=True),
        ],
    )
    result = _build(recipe, datasets, build_dir)
    by_source = Counter((row.source, row.split) for row in result.rows)
    assert by_source["hannover", "external"] == 243
    assert not any(row.split == "external" for row in result.rows if row.source == "ieee8023")
    overlap = [e for e in result.excluded if e.kind == sources.HOLDOUT_OVERLAP]
    assert len(overlap) >= 82  # ieee8023's copies of Hannover images (and their patients)
    assert {e.source for e in overlap} == {"ieee8023"}


def _user_csv(datasets: Path, root: Path) -> Path:
    root.mkdir()
    files = sorted((datasets / "covid-19-image-repository" / "png").iterdir())[:3]
    files += sorted((datasets / "kaggle-normal-196" / "NORMAL").iterdir())[:3]
    lines = ["path,label,patient_id"]
    for index, file in enumerate(files):
        shutil.copy(file, root / file.name)
        lines.append(f"{file.name},{'covid' if index < 3 else 'normal'},p{index}")
    (root / "broken.png").write_text("not a radiograph\n")
    lines += ["broken.png,covid,p9", "lost.png,normal,p10"]
    table = root / "cases.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def test_cli_build_reports_unreadable_and_missing_files_and_exports(
    datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _user_csv(datasets, tmp_path / "hospital")
    out = tmp_path / "out"
    code = main(
        [
            "data",
            "build",
            "--source",
            f"csv:{table}",
            "--out",
            str(out),
            "--data-root",
            str(datasets),
            "--workers",
            "1",
            "--export-folders",
            str(tmp_path / "export"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    lines = printed.splitlines()
    assert any(
        line.startswith("  [unreadable image] cases: ") and "broken.png" in line for line in lines
    )
    assert "  [missing file] cases: lost.png: image file not on disk" in lines
    assert "excluded: 2 (" in printed
    rows = load_manifest(out / "manifest.csv")
    assert len(rows) == 6
    assert all(row.path.is_file() for row in rows)  # absolute paths: outside the data root
    export = tmp_path / "export"
    exported = [p.relative_to(export).parts for p in export.rglob("*") if p.is_file()]
    assert len(exported) == 6
    assert {parts[1] for parts in exported} <= {"Train", "Validation", "Test"}
    assert {parts[2] for parts in exported} == {"COVID", "Normal"}


def test_cli_build_without_sources_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "build"]) == 2
    assert "give a --recipe" in capsys.readouterr().err
    assert main(["data", "build", "--source", "nowhere"]) == 2
    assert "expected KIND:PATH" in capsys.readouterr().err
