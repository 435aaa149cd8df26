"""Train the input gate end to end: out-of-scope pictures, cached features, head, threshold,
ONNX export and the report under docs/results/input-gate/.

    covid-cxr data build --recipe configs/data/default.toml      # the patient-level split
    python scripts/train_gate.py                                  # everything below, cached

Every step writes into the ignored folder data/gate/ and is skipped when its output exists
(delete the file to redo it): oos/ (pictures + index.csv), features.npz, then the model
src/covid_cxr/shipped/covid-cxr-gate.onnx and the report.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from covid_cxr.gate import oos
from covid_cxr.gate.training import Example, extract_features, out_of_scope, radiographs
from covid_cxr.paths import REPO_ROOT, data_root

DATA = REPO_ROOT / "data"


def laterals(root: Path) -> list[oos.RadiographRef]:
    folder = root / "covid-chestxray-dataset"
    with (folder / "metadata.csv").open(newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r["view"] == "L"]
    refs = []
    for row in rows:
        path = folder / row["folder"] / row["filename"]
        if path.is_file():
            split = oos.stable_split(f"ieee8023:{row['patientid']}")
            refs.append(oos.RadiographRef(path, split, f"ieee8023 lateral {row['filename']}"))
    return refs


def variant_bases(examples: list[Example], per_source: int = 70) -> list[oos.RadiographRef]:
    """Radiographs to rotate, invert and crop: train and test patients of every source."""
    rng = np.random.default_rng(1)
    refs = []
    for source in sorted({e.kind for e in examples}):
        for split, count in (("train", per_source * 5 // 7), ("test", per_source * 2 // 7)):
            pool = [e for e in examples if e.kind == source and e.split == split]
            for i in rng.permutation(len(pool))[:count]:
                refs.append(oos.RadiographRef(pool[i].path, split, f"{source} {pool[i].path.name}"))
    return refs


def capped(
    examples: list[Example], source: str = "kaggle-pneumonia", cap: int = 1500
) -> list[Example]:
    """At most `cap` training images of the one large source (Kaggle: 4,000 of 200 px children):
    enough to learn it, and the other sources are not drowned out."""
    rng = np.random.default_rng(2)
    train = [i for i, e in enumerate(examples) if e.kind == source and e.split == "train"]
    dropped = set(rng.permutation(train)[cap:].tolist())
    return [e for i, e in enumerate(examples) if i not in dropped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, default=DATA / "default" / "manifest.csv")
    parser.add_argument("--work", type=Path, default=DATA / "gate")
    parser.add_argument("--stage", choices=("features", "all"), default="all")
    args = parser.parse_args(argv)
    root = data_root()
    inscope = radiographs(args.manifest, root)
    index_path = args.work / "oos" / "index.csv"
    if not index_path.is_file():
        rows = oos.build_oos(args.work / "oos", variant_bases(inscope), laterals(root))
        print(f"out-of-scope pictures: {len(rows)} written under {index_path.parent}")
    examples = capped(inscope) + out_of_scope(oos.read_index(index_path))
    features = cached_features(args.work / "features.npz", [e.path for e in examples])
    if args.stage == "features":
        return 0
    from covid_cxr.gate.report import fit_and_report

    return fit_and_report(examples, features)


def cached_features(cache: Path, paths: list[Path]) -> np.ndarray:
    """Encoder features by path: extracted once, only missing paths are extracted later."""
    known: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache) as stored:
            known = dict(zip(stored["paths"].tolist(), stored["features"], strict=True))
    missing = [p for p in paths if str(p) not in known]
    for chunk, features in extract_features(missing, cache.parent):
        known.update(zip(map(str, chunk), features, strict=True))
        names = sorted(known)
        np.savez(cache, paths=np.array(names), features=np.stack([known[n] for n in names]))
        print(f"features: {len(known)} cached in {cache}", flush=True)
    return np.stack([known[str(p)] for p in paths])


if __name__ == "__main__":
    sys.exit(main())
