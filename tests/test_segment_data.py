"""The lung-mask reader and its patient split, on the real mask collections."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from covid_cxr.cli import main
from covid_cxr.config import SplitConfig
from covid_cxr.data.masks import (
    EMPTY_MASK,
    SIZE_MISMATCH,
    MaskSet,
    load_mask_manifest,
    read_mask_sources,
    split_masks,
)
from covid_cxr.data.sources import UNREADABLE


@pytest.fixture(scope="module")
def masks(datasets: Path) -> MaskSet:
    return read_mask_sources(datasets)


def test_every_published_mask_is_read_with_its_patient(masks: MaskSet) -> None:
    counts = Counter(r.source for r in masks.records)
    assert counts == {"jsrt": 247, "openist": 275, "ieee8023": 374}
    assert masks.excluded == []
    assert all(r.image.is_file() and r.mask.is_file() for r in masks.records)
    patients = {
        r.source: len({p.patient_id for p in masks.records if p.source == r.source})
        for r in masks.records
    }
    # JSRT: one image per patient; OpenIST: none given, each its own; ieee8023: from metadata.
    assert patients == {"jsrt": 247, "openist": 275, "ieee8023": 226}


def test_split_is_by_patient_and_keeps_near_duplicates_together(masks: MaskSet) -> None:
    records = split_masks(masks, SplitConfig(seed=42))
    assert Counter(r.split for r in records).keys() == {"train", "val", "test"}
    splits_of: dict[str, set[str]] = {}
    for r in records:
        splits_of.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    split_of_image = {str(r.image): r.split for r in records}
    openist_pairs = [(a, b) for a, b, _ in masks.near_duplicates if "openist-normal" in a]
    assert openist_pairs, "the OpenIST near-duplicate pair is found"
    for a, b, _ in masks.near_duplicates:
        assert split_of_image[a] == split_of_image[b]
    for source in ("jsrt", "openist", "ieee8023"):
        test = sum(r.split == "test" for r in records if r.source == source)
        total = sum(r.source == source for r in records)
        assert 0.1 < test / total < 0.2


def test_unusable_pairs_are_reported_with_their_reason(datasets: Path, tmp_path: Path) -> None:
    """A mask of the wrong size, a text file named .png and an empty mask are left out."""
    jsrt = tmp_path / "jsrt"
    (jsrt / "images").mkdir(parents=True)
    (jsrt / "masks").mkdir()
    lines = ["image,mask,patient_id,finding,publisher_split"]
    for name in ("JPCLN009", "JPCLN010", "JPCLN011", "JPCLN012"):
        shutil.copy(datasets / "jsrt" / "images" / f"{name}.png", jsrt / "images")
        shutil.copy(datasets / "jsrt" / "masks" / f"{name}.png", jsrt / "masks")
        lines.append(f"images/{name}.png,masks/{name}.png,{name},no nodule,Train")
    lines.append("images/JPCLN099.png,masks/JPCLN099.png,JPCLN099,no nodule,Train")  # missing
    (jsrt / "metadata.csv").write_text("\n".join(lines) + "\n")
    Image.open(jsrt / "masks" / "JPCLN010.png").resize((256, 256)).save(
        jsrt / "masks" / "JPCLN010.png"
    )
    (jsrt / "masks" / "JPCLN011.png").write_text("not a mask")
    Image.new("L", (512, 512), 0).save(jsrt / "masks" / "JPCLN012.png")

    result = read_mask_sources(tmp_path, sources=["jsrt"])
    assert [r.patient_id for r in result.records] == ["jsrt:JPCLN009"]
    reasons = {Path(e.item).name: (e.kind, e.reason) for e in result.excluded}
    assert reasons["JPCLN010.png"][0] == SIZE_MISMATCH
    assert "(256, 256)" in reasons["JPCLN010.png"][1] and "(512, 512)" in reasons["JPCLN010.png"][1]
    assert reasons["JPCLN011.png"][0] == UNREADABLE and "mask" in reasons["JPCLN011.png"][1]
    assert reasons["JPCLN012.png"][0] == EMPTY_MASK
    assert reasons["JPCLN099.png"][1] == "file not on disk"


def test_data_masks_command_writes_a_loadable_manifest(
    datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lungs" / "manifest.csv"
    assert main(["data", "masks", "--out", str(out), "--data-root", str(datasets)]) == 0
    text = capsys.readouterr().out
    assert "896 mask pairs written" in text and "0 left out" in text
    records = load_mask_manifest(out, root=datasets)
    assert len(records) == 896 and all(r.image.is_file() for r in records)
    assert out.read_text().splitlines()[0] == "image,mask,source,patient_id,split"
    assert "/work" not in out.read_text()  # paths relative to the data root
    assert (out.parent / "excluded.csv").read_text().startswith("source,item,kind,reason")
