"""Bootstrap CIs: the vectorised implementation against a per-resample loop over scikit-learn.

Prints the time of 1000 patient-clustered resamples of every metric (ROC-AUC, PR-AUC, Brier,
ECE, and the six threshold metrics at two operating points) for a few dataset sizes, the
baseline's time and the speed-up, and checks that both give the same intervals.

    python benchmarks/evaluation_bootstrap.py [--resamples 1000] [--sizes 1000 3000 6000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from covid_cxr.evaluation.bootstrap import percentile_ci, resample_weights
from covid_cxr.evaluation.metrics import assess


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images of n/3 patients (up to 3 images each), scores that separate the classes."""
    rng = np.random.default_rng(seed)
    clusters = np.sort(rng.integers(0, n // 3, n))
    patient_y = rng.random(n // 3) < 0.4
    y = patient_y[clusters].astype(np.int64)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, p, clusters


def loop_baseline(y, p, clusters, resamples, seed):
    """The obvious implementation: materialise each resample, call scikit-learn."""
    w = resample_weights(clusters, resamples, seed).astype(np.int64)
    auc, ap, brier = [], [], []
    for row in w:
        idx = np.repeat(np.arange(y.size), row)
        yy, pp = y[idx], p[idx]
        if 0 < yy.sum() < yy.size:
            auc.append(roc_auc_score(yy, pp))
            ap.append(average_precision_score(yy, pp))
        brier.append(brier_score_loss(yy, pp))
    return {
        "roc_auc": percentile_ci(np.array(auc)),
        "pr_auc": percentile_ci(np.array(ap)),
        "brier": percentile_ci(np.array(brier)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 6000])
    args = parser.parse_args()
    print(f"{'images':>7} {'vectorised s':>13} {'loop (3 metrics) s':>19} {'speed-up':>9}")
    for n in args.sizes:
        y, p, clusters = synthetic(n)
        start = time.perf_counter()
        result = assess(y, p, clusters, {"default": 0.5, "youden": 0.4}, args.resamples, seed=0)
        fast = time.perf_counter() - start
        start = time.perf_counter()
        slow_ci = loop_baseline(y, p, clusters, args.resamples, seed=0)
        slow = time.perf_counter() - start
        for name, ci in slow_ci.items():
            assert np.allclose(result["scores"][name]["ci"], ci), (name, ci)
        print(f"{n:>7} {fast:>13.2f} {slow:>19.2f} {slow / fast:>8.0f}x")
    print("intervals identical to the scikit-learn loop (same resamples)")


if __name__ == "__main__":
    main()
