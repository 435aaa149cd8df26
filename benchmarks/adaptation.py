"""Adaptation to a site from a few of its labels: ROC-AUC against the number of local labels.

Simulates sites from the shared public data and, for each number of labelled radiographs per
class, draws that many at random (10 draws), runs exactly what `covid-cxr adapt` decides
(`covid_cxr.adaptation.site.fit_site`: nested cross-validation by patient, base head kept
unless the refit wins) and scores the result on the site's other radiographs (patients of the
labelled draw removed). Baselines in the same run: the base model, and a plain logistic
regression on the pooled features (C = 1, no selection, no fallback).

Sites (the shipped model's backbone was trained on the default manifest's train split, val
choosing the epoch, before JSRT and OpenIST were added; its head was then refitted on the
train split with JSRT and OpenIST in it, so only their val + test patients are used here):
  ieee8023  COVID-19 vs other findings from ieee8023's val + test patients: one collection with
            both classes, whose train patients the model saw (a "known" site).
  jsrt      JSRT adult non-COVID radiographs (Japan, digitised film), val + test patients, vs
            ieee8023 COVID-19 val + test patients.
  openist   OpenIST normal adults (US teaching collection), val + test, vs the same COVID-19.
The COVID-19 side of jsrt and openist can only come from a source the model saw (ieee8023's
unseen patients): no public COVID-19 set from those hospitals exists. That is a limitation of
these simulations, not of the method.

Also times `covid-cxr adapt` end to end on 50 + 50 radiographs of the openist site (reading,
features, cross-validation, writing and checking the model), against plain prediction of the
same images by the base model, measured in the same run.

Features are cached under data/adaptation/ (keyed by model and image list), so repeated runs
do not re-run the network. Needs the default manifest:
    covid-cxr data build --recipe configs/data/default.toml
    python benchmarks/adaptation.py [--draws 10] [--out docs/results/adaptation]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.adaptation.adapt import AdaptOptions, adapt
from covid_cxr.adaptation.crossval import roc_auc
from covid_cxr.adaptation.features import extract_features
from covid_cxr.adaptation.head import Basis, LinearHead, fit_head
from covid_cxr.adaptation.site import fit_site
from covid_cxr.data.manifest import ManifestRow, load_manifest
from covid_cxr.evaluation.bootstrap import cluster_ids
from covid_cxr.inference.metadata import read_metadata
from covid_cxr.inference.predictor import Predictor
from covid_cxr.paths import DEFAULT_MODEL

LABELS = (10, 20, 50, 100)
MIN_TEST_PER_CLASS = 10
UNSEEN_SPLITS = ("val", "test")


@dataclass
class Site:
    name: str
    rows: list[ManifestRow]
    note: str


def build_sites(rows: list[ManifestRow]) -> list[Site]:
    ieee = [r for r in rows if r.source == "ieee8023" and r.split in UNSEEN_SPLITS]
    covid = [r for r in ieee if r.target]
    jsrt = [r for r in rows if r.source == "jsrt" and r.split in UNSEEN_SPLITS]
    openist = [r for r in rows if r.source == "openist-normal" and r.split in UNSEEN_SPLITS]
    return [
        Site("ieee8023", ieee, "ieee8023 val+test patients, both classes (train split seen)"),
        Site("jsrt", jsrt + covid, "JSRT val+test non-COVID vs ieee8023 val+test COVID-19"),
        Site("openist", openist + covid, "OpenIST val+test normal vs ieee8023 val+test COVID-19"),
    ]


def cached_features(
    model: Path, rows: list[ManifestRow], cache: Path
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(pooled, base logits, indices of the rows that were read) from the cache or the model."""
    key = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    key += hashlib.sha256("\n".join(str(r.path) for r in rows).encode()).hexdigest()[:12]
    path = cache / f"features-{key}.npz"
    if path.is_file():
        data = np.load(path)
        return data["pooled"], data["logits"], list(data["kept"])
    local = extract_features(Predictor(model, threads=2), rows)
    index = {r.path: i for i, r in enumerate(rows)}
    kept = [index[r.path] for r in local.rows]
    for failure in local.failures:
        print(f"  unreadable: {failure.source}: {failure.reason}")
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, pooled=local.pooled, logits=local.base_logits, kept=np.array(kept))
    return local.pooled, local.base_logits, kept


def draw(y: np.ndarray, clusters: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of n labelled images per class, drawn at random."""
    chosen = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in (0, 1)])
    mask = np.zeros(y.size, dtype=bool)
    mask[chosen] = True
    return mask


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean over draws with a normal-approximation 95% interval of that mean."""
    a = np.asarray(values)
    half = 1.96 * a.std(ddof=1) / np.sqrt(a.size) if a.size > 1 else 0.0
    return float(a.mean()), float(a.mean() - half), float(a.mean() + half)


def run_site(
    site: Site, pooled: np.ndarray, logits: np.ndarray, base: LinearHead, draws: int
) -> list[dict]:
    y = np.array([r.target for r in site.rows])
    clusters = cluster_ids([r.patient_id for r in site.rows], [r.source for r in site.rows])
    results = []
    for n in LABELS:
        if min(int(y.sum()), int((1 - y).sum())) - n < MIN_TEST_PER_CLASS:
            continue
        rng = np.random.default_rng(n)
        scores: dict[str, list[float]] = {"base": [], "plain": [], "adapt": []}
        adopted = 0
        for i in range(draws):
            train = draw(y, clusters, n, rng)
            test = ~np.isin(clusters, clusters[train])
            fit = fit_site(pooled[train], logits[train], y[train], clusters[train], base,
                           repeats=2, resamples=200, seed=i)  # fmt: skip
            plain = fit_head(Basis.of(pooled[train]), y[train], 1.0)
            scores["base"].append(roc_auc(y[test], logits[test]))
            scores["plain"].append(roc_auc(y[test], plain.logits(pooled[test])))
            scores["adapt"].append(roc_auc(y[test], fit.head.logits(pooled[test])))
            adopted += fit.adopted
        row = {"site": site.name, "labels_per_class": n, "draws": draws, "adopted": adopted}
        row.update({name: mean_ci(values) for name, values in scores.items()})
        results.append(row)
        print(
            f"{site.name:<9} {n:>4} per class: base {fmt(row['base'])}  plain LR "
            f"{fmt(row['plain'])}  adapt {fmt(row['adapt'])}  (refit kept {adopted}/{draws})",
            flush=True,
        )
    return results


def fmt(estimate: tuple[float, float, float]) -> str:
    return f"{estimate[0]:.3f} ({estimate[1]:.3f}-{estimate[2]:.3f})"


def timing(site: Site, model: Path, per_class: int = 50) -> dict:
    """Seconds for `adapt` on per_class + per_class images, and for predicting them."""
    rng = np.random.default_rng(0)
    rows = [r for c in (1, 0) for r in rng.permutation([r for r in site.rows if r.target == c])]
    picked = [r for r in rows if r.target][:per_class] + [r for r in rows if not r.target][
        :per_class
    ]
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "site.csv"
        with data.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"])
            writer.writerows([r.path, r.label, r.patient_id] for r in picked)
        start = time.perf_counter()
        Predictor(model, threads=2).predict_batch([r.path for r in picked], batch_size=32)
        predict_s = time.perf_counter() - start
        result = adapt(AdaptOptions(data=data, out=Path(folder) / "a.onnx", model=model))
    print(
        f"adapt on {len(picked)} radiographs: {result.seconds:.1f} s end to end; predicting the "
        f"same images with the base model: {predict_s:.1f} s ({result.seconds / predict_s:.1f}x)"
    )
    return {"images": len(picked), "adapt_s": result.seconds, "predict_s": predict_s}


def write_outputs(out: Path, results: list[dict], sites: list[Site], times: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"sites": {s.name: s.note for s in sites}, "results": results,
                    "timing": times}, indent=2) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    lines = [
        "| site | labels per class | base model | plain LR (C=1) | adapt | refit kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['site']} | {r['labels_per_class']} | {fmt(r['base'])} | {fmt(r['plain'])} | "
            f"{fmt(r['adapt'])} | {r['adopted']}/{r['draws']} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    figure, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.6), sharey=True)
    for ax, site in zip(np.atleast_1d(axes), sites, strict=True):
        rows = [r for r in results if r["site"] == site.name]
        x = [r["labels_per_class"] for r in rows]
        for key, label in (("base", "base model"), ("plain", "plain LR"), ("adapt", "adapt")):
            mean = np.array([r[key][0] for r in rows])
            lo, hi = np.array([r[key][1] for r in rows]), np.array([r[key][2] for r in rows])
            ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_title(site.name)
        ax.set_xlabel("labelled radiographs per class")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("ROC-AUC on the site's other radiographs")
    np.atleast_1d(axes)[-1].legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "auc-vs-labels.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data/default/manifest.csv"))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path("data/adaptation"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/adaptation"))
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    if not args.manifest.is_file():
        raise SystemExit(
            f"{args.manifest} not found: build it first with "
            "`covid-cxr data build --recipe configs/data/default.toml`"
        )
    sites = build_sites(load_manifest(args.manifest))
    _, cam = read_metadata(args.model)
    assert cam is not None
    base = LinearHead(cam.weight.astype(np.float64), cam.bias)
    results = []
    for site in sites:
        pooled, logits, kept = cached_features(args.model, site.rows, args.cache)
        site.rows = [site.rows[i] for i in kept]
        print(f"{site.name}: {site.note}; {len(site.rows)} images", flush=True)
        results += run_site(site, pooled, logits, base, args.draws)
    times = {} if args.no_timing else timing(sites[-1], args.model)
    write_outputs(args.out, results, sites, times)
    print(f"wrote {args.out}/table.md, results.json, auc-vs-labels.png")


if __name__ == "__main__":
    main()
