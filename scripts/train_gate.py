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
    examples = inscope + out_of_scope(oos.read_index(index_path))
    cache = args.work / "features.npz"
    if not cache.is_file():
        features = extract_features([e.path for e in examples])
        np.savez(cache, features=features, paths=np.array([str(e.path) for e in examples]))
        print(f"features: {features.shape} cached in {cache}")
    if args.stage == "features":
        return 0
    from covid_cxr.gate.report import fit_and_report

    return fit_and_report(examples, cache)


if __name__ == "__main__":
    sys.exit(main())
