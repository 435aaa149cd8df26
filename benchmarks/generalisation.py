"""Leave-source-out on frozen features: how a head fitted without some sources does on them.

    python benchmarks/generalisation.py --before ROUND1.onnx [--manifest M] [--out DIR]

(ROUND1.onnx: the round-1 shipped model, e.g. `git show 8a4614c:src/covid_cxr/shipped/
covid-cxr-default.onnx > /tmp/round1.onnx`; its backbone is the shipped one, its head the
'before'.)

For each group of held-out sources (the three of issue #9: (a) Hannover + JSRT + OpenIST, an
unseen COVID-19 hospital against unseen normal hospitals; (b) ieee8023, the one source with
both classes; (c) NIH + JSRT + OpenIST, every adult normal unseen), a linear head is fitted
on the shipped backbone's pooled features of the OTHER sources' train split, its threshold
chosen on their val split, and it is scored on the held-out sources (every split; for (c),
whose held-out images are all non-COVID, against the seen sources' COVID-19 test images).
Heads compared: the shipped round-1 head (fitted on every source, so it has seen them: the
'before'), a plain logistic regression, and one with every (source, class) group weighted
equally (the round-2 recipe). AUC, sensitivity and specificity with 95% CIs resampling
patients.

Caveat, stated with the table: the backbone itself was fine-tuned on the train split of every
source but JSRT and OpenIST, so this isolates what the head and the weighting do, not what a
backbone trained without those sources would learn: benchmarks/leave_source_out.py retrains
it per held-out group (docs/results/leave-source-out-trained/).
Features come from scripts/refit_head.py's cache (data/features/), extracted if missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from refit_head import Features, extract, fit

from covid_cxr.data.manifest import ManifestRow, load_manifest
from covid_cxr.evaluation.bootstrap import cluster_ids
from covid_cxr.evaluation.metrics import assess
from covid_cxr.evaluation.thresholds import balanced_youden_threshold
from covid_cxr.inference.metadata import read_metadata
from covid_cxr.inference.predictor import Predictor
from covid_cxr.numeric import sigmoid

HELD_OUT = {
    "a: Hannover + JSRT + OpenIST": {"hannover", "jsrt", "openist-normal"},
    "b: ieee8023": {"ieee8023"},
    "c: NIH + JSRT + OpenIST": {"nih", "jsrt", "openist-normal"},
}
ROUND1_BASE = "round-1 head (saw every source)"


def subset(features: Features, keep: np.ndarray) -> Features:
    index = np.flatnonzero(keep)
    return Features([features.rows[i] for i in index], features.pooled[index])


def evaluation_set(features: Features, held: set[str]) -> Features:
    """The held-out sources' images, plus seen COVID-19 test images when they have none."""
    mask = np.array([r.source in held for r in features.rows])
    if not any(features.rows[i].target for i in np.flatnonzero(mask)):
        mask |= np.array([r.split == "test" and r.target == 1 for r in features.rows])
    return subset(features, mask)


def score(scored: Features, probabilities: np.ndarray, threshold: float) -> dict[str, str]:
    return score_rows(scored.rows, probabilities, threshold)


def score_rows(
    rows: list[ManifestRow], probabilities: np.ndarray, threshold: float
) -> dict[str, str]:
    """AUC, and sensitivity and specificity at `threshold`, with 95% CIs resampling patients."""
    clusters = cluster_ids([r.patient_id for r in rows], [r.source for r in rows])
    targets = np.array([r.target for r in rows], dtype=np.float64)
    result = assess(targets, probabilities, clusters, {"t": threshold}, 1000, 0)
    at = result.operating_points["t"].metrics
    return {
        "n": f"{result.n} ({result.n_covid} COVID-19)",
        "auc": str(result.scores["roc_auc"]),
        "sensitivity": str(at["sensitivity"]),
        "specificity": str(at["specificity"]),
        "threshold": f"{threshold:.3g}",
    }


def heads(train: Features, base: tuple[np.ndarray, float]) -> dict[str, tuple[np.ndarray, float]]:
    plain = Features(train.rows, train.pooled)
    plain.group_weights = lambda: np.ones(len(plain.rows))  # type: ignore[method-assign]
    return {
        ROUND1_BASE: base,
        "plain logistic regression": fit(plain, 0.003),
        "every (source, class) equal": fit(train, 0.003),
    }


def markdown_table(
    table: list[dict[str, str]], keys: list[str], extra: tuple[str, ...] = ()
) -> list[str]:
    """The rows of `table` as markdown: its `keys` columns, the scores, then `extra` columns
    ("–" where a row has none)."""
    scores = ["images", "ROC-AUC", "sensitivity", "specificity", "threshold", *extra]
    lines = ["| " + " | ".join(keys + scores) + " |", "|" + "---|" * (len(keys) + len(scores))]
    for r in table:
        cells = [r[k] for k in keys]
        cells += [r["n"], r["auc"], r["sensitivity"], r["specificity"], r["threshold"]]
        cells += [r.get(column, "–") for column in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=Path("data/default/manifest.csv"))
    parser.add_argument("--before", type=Path, required=True, help="model whose head is 'before'")
    parser.add_argument("--out", type=Path, default=Path("docs/results/leave-source-out"))
    args = parser.parse_args()
    predictor = Predictor(args.before)
    features = extract(
        predictor,
        load_manifest(args.manifest),
        Path("data/features") / f"covid-cxr-default-{predictor.version}.npz",
    )
    _, head = read_metadata(args.before)
    assert head is not None, f"{args.before} has no pooled-linear head"
    base = (head.weight.astype(np.float64), head.bias)
    table = []
    for name, held in HELD_OUT.items():
        seen = np.array([r.source not in held for r in features.rows])
        train = subset(features, seen & np.array([r.split == "train" for r in features.rows]))
        val = subset(features, seen & np.array([r.split == "val" for r in features.rows]))
        scored = evaluation_set(features, held)
        for head_name, (weight, bias) in heads(train, base).items():
            val_p = sigmoid(val.pooled @ weight + bias)
            threshold = balanced_youden_threshold(val.targets, val_p, [r.source for r in val.rows])
            row = score(scored, sigmoid(scored.pooled @ weight + bias), threshold)
            table.append({"held out": name, "head": head_name, **row})
            print(json.dumps(table[-1]), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    lines = markdown_table(table, ["held out", "head"])
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
