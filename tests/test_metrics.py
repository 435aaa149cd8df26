"""Metrics against values worked out by hand, undefined metrics, the patient-clustered
bootstrap, and operating points chosen on a hand case."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from covid_cxr.errors import DataError
from covid_cxr.evaluation.bootstrap import cluster_ids, resample_weights
from covid_cxr.evaluation.calibration import reliability
from covid_cxr.evaluation.metrics import assess, score_metrics, threshold_metrics
from covid_cxr.evaluation.result import Confusion, Estimate
from covid_cxr.evaluation.thresholds import (
    balanced_youden_threshold,
    choose_operating_points,
    sensitivity_threshold,
    youden_threshold,
)

# The hand case: 4 COVID-19 (1) and 6 non-COVID (0); one positive ties a negative at 0.3.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.3, 0.2, 0.1, 0.05])
ONE = np.ones((1, Y.size))


def point(values: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v[0]) for k, v in values.items()}


def test_threshold_metrics_by_hand() -> None:
    # At 0.5: predicted COVID-19 are 0.9, 0.8, 0.6 (true) and 0.7 (false).
    # TP=3 FN=1 (0.3) FP=1 TN=5.
    m = point(threshold_metrics(ONE, Y, P, 0.5))
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_threshold_is_inclusive() -> None:
    # At 0.3 both tied images are predicted COVID-19: TP=4 FP=3 (0.7, 0.4, 0.3).
    m = point(threshold_metrics(ONE, Y, P, 0.3))
    assert m["sensitivity"] == 1.0
    assert m["specificity"] == pytest.approx(3 / 6)


def test_score_metrics_by_hand() -> None:
    m = point(score_metrics(ONE, Y, P))
    # ROC-AUC by pair counting (24 positive/negative pairs; a tie counts 1/2):
    # 0.9 beats 6, 0.8 beats 6, 0.6 beats 5 (not 0.7), 0.3 beats 3 and ties 1 -> 20.5 / 24.
    assert m["roc_auc"] == pytest.approx(20.5 / 24)
    # Average precision: precision where each positive enters, thresholds high to low
    # 0.9: 1/1, 0.8: 2/2, 0.6: 3/4, 0.3 (tie, one threshold): 4/7 -> mean of the four.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 7) / 4)
    # Brier: positives .01+.04+.16+.49 = .70, negatives .49+.16+.09+.04+.01+.0025 = .7925.
    assert m["brier"] == pytest.approx((0.70 + 0.7925) / 10)
    # ECE, 10 equal-width bins: sum over bins of |sum(y) - sum(p)| / n.
    # bin 9: .1, 8: .2, 7: .7, 6: .4, 4: .4, 3: |1 - .6| = .4, 2: .2, 1: .1, 0: .05 -> 2.55.
    assert m["ece"] == pytest.approx(2.55 / 10)


def test_score_metrics_agree_with_scikit_learn_on_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(500), 0, 1), 1)  # many ties
    m = point(score_metrics(np.ones((1, 500)), y, p))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))


def test_ece_is_the_count_weighted_gap_of_the_reliability_table() -> None:
    table = reliability(Y, P)
    assert sum(row.count for row in table) == Y.size
    assert [row.count for row in table] == [1, 1, 1, 2, 1, 0, 1, 1, 1, 1]
    gap = sum(
        row.count / Y.size * abs(row.fraction_covid - row.mean_probability)
        for row in table
        if row.count
    )
    assert point(score_metrics(ONE, Y, P))["ece"] == pytest.approx(gap)


def test_weights_are_multiplicities() -> None:
    # Drawing image 0 twice and dropping image 9 is the same as duplicating the data.
    w = np.ones((1, Y.size))
    w[0, 0], w[0, 9] = 2, 0
    keep = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    expected = point(score_metrics(np.ones((1, 10)), Y[keep], P[keep]))
    assert point(score_metrics(w, Y, P)) == pytest.approx(expected)


def test_undefined_metrics_on_one_class_data_are_null_with_reason() -> None:
    # An all-COVID external source (like the Hannover archive).
    y = np.ones(6, dtype=int)
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.95])
    result = assess(y, p, np.arange(6), {"default": 0.5}, resamples=200, seed=0)
    scores = result.scores
    for name in ("roc_auc", "pr_auc"):
        assert scores[name].value is None and scores[name].ci is None
        assert "only one class" in scores[name].reason
        assert str(scores[name]).startswith("n/a: ")
    assert scores["brier"].value == pytest.approx(np.mean((1 - p) ** 2))
    metrics = result.operating_points["default"].metrics
    assert metrics["specificity"] == Estimate(None, None, "no non-COVID images")
    assert metrics["npv"].value is None and "predicted non-COVID" in metrics["npv"].reason
    assert metrics["sensitivity"].value == 1.0
    assert result.operating_points["default"].confusion == Confusion(tp=6, fp=0, tn=0, fn=0)


def test_bootstrap_ci_contains_the_point_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + 0.65 * rng.random(300), 0, 1)
    a = assess(y, p, np.arange(300), {"default": 0.5}, resamples=500, seed=7)
    b = assess(y, p, np.arange(300), {"default": 0.5}, resamples=500, seed=7)
    assert a == b
    estimates = [*a.scores.values(), *a.operating_points["default"].metrics.values()]
    for est in estimates:
        lo, hi = est.ci
        assert lo <= est.value <= hi
        assert hi - lo > 0
        assert est.ci_resamples == 500
        assert str(est) == f"{est.value:.3f} ({lo:.3f}–{hi:.3f})"


def test_patients_move_together_in_the_bootstrap() -> None:
    clusters = cluster_ids(["a", "a", "b", None, "c", "c", "c", None], ["s"] * 8)
    assert clusters[0] == clusters[1] and clusters[4] == clusters[5] == clusters[6]
    assert len(set(clusters)) == 5  # a, b, c and two images without id
    w = resample_weights(clusters, 2000, seed=0)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 4] == w[:, 6]).all()
    assert not (w[:, 3] == w[:, 7]).all()
    # Each resample draws as many patients as there are.
    per_cluster = w[:, [0, 2, 3, 4, 7]]
    assert (per_cluster.sum(axis=1) == 5).all()


def test_same_patient_id_in_two_sources_is_two_patients() -> None:
    clusters = cluster_ids(["7", "7"], ["cohen", "hannover"])
    assert clusters[0] != clusters[1]


def test_resampling_patients_widens_the_ci_when_their_images_agree() -> None:
    # 40 patients, 10 near-identical images each: 400 images but only 40 independent cases.
    rng = np.random.default_rng(1)
    patient_y = rng.integers(0, 2, 40)
    patient_p = np.clip(0.3 * patient_y + 0.7 * rng.random(40), 0, 1)
    y = np.repeat(patient_y, 10)
    p = np.repeat(patient_p, 10)
    patients = np.repeat(np.arange(40), 10)

    def width(clusters: np.ndarray) -> float:
        lo, hi = assess(y, p, clusters, {}, resamples=1000, seed=0).scores["roc_auc"].ci
        return hi - lo

    assert width(patients) > 2 * width(np.arange(400))


def test_youden_and_target_sensitivity_by_hand() -> None:
    # Youden J = sens + spec - 1 at each candidate: 0.9: .25, 0.8: .5, 0.7: .333,
    # 0.6: 3/4 + 5/6 - 1 = .583 (best), 0.4: .417, 0.3: 1 + 3/6 - 1 = .5, ...
    assert youden_threshold(Y, P) == 0.6
    # 95% of 4 positives needs all 4 -> the lowest positive score, 0.3.
    assert sensitivity_threshold(Y, P, 0.95) == 0.3
    # 75% needs 3 (exactly; no floating-point round-up to 4) -> 0.6; 50% needs 2 -> 0.8.
    assert sensitivity_threshold(Y, P, 0.75) == 0.6
    assert sensitivity_threshold(Y, P, 0.5) == 0.8
    assert choose_operating_points(Y, P, 0.9) == {
        "default": 0.5,
        "youden": 0.6,
        "sensitivity_90": 0.3,
    }


def test_balanced_youden_gives_every_source_an_equal_say() -> None:
    # Source "kids": 8 negatives scored 0.1 and a positive at 0.9; source "adults": positives
    # at 0.75 and 0.55, negatives at 0.5, 0.6 and 0.65. Plain Youden, dominated by the 8
    # children, picks 0.55 (J = 1 + 9/11 - 1), where 2 of the 3 adult negatives are called
    # COVID-19. Averaged per source: at 0.55 sens 1, spec (1 + 1/3) / 2 -> 1.667; at 0.75
    # sens (1 + 1/2) / 2, spec 1 -> 1.75, the best: no adult negative is called COVID-19.
    y = np.array([0] * 8 + [1] + [1, 1, 0, 0, 0])
    p = np.array([0.1] * 8 + [0.9] + [0.75, 0.55, 0.5, 0.6, 0.65])
    groups = ["kids"] * 9 + ["adults"] * 5
    assert youden_threshold(y, p) == 0.55
    assert balanced_youden_threshold(y, p, groups) == 0.75
    points = choose_operating_points(y, p, 0.95, groups)
    assert points["youden_balanced"] == 0.75
    assert "youden_balanced" not in choose_operating_points(y, p, 0.95, ["one"] * 14)


def test_thresholds_need_both_classes() -> None:
    with pytest.raises(DataError, match="both COVID-19 and non-COVID"):
        youden_threshold(np.ones(5), np.linspace(0, 1, 5))
