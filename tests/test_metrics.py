"""Metrics checked against numbers worked out by hand (spoof = 1 = positive, predicted spoof iff score >= t)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ptanet.metrics import (
    apcer_per_type,
    auc,
    compute_metrics,
    confusion,
    eer,
    eer_point,
    eer_threshold,
    errors_per_group,
    selection_key,
    tpr_at_fpr,
)

# Worked example: 4 live, 6 spoof, threshold 0.5.
#   live  scores 0.1 0.3 0.6 0.2   -> 0.6 is rejected as spoof: FP = 1, TN = 3  -> BPCER = 1/4
#   spoof scores 0.9 0.8 0.7 0.65 0.45 0.35 -> 0.45, 0.35 pass as live: FN = 2, TP = 4 -> APCER = 2/6
#   ACER = (1/3 + 1/4) / 2 = 7/24; accuracy = (TP + TN) / 10 = 7/10
#   AUC: of the 24 (spoof, live) pairs, 0.45 and 0.35 each lose to live 0.6, all others win -> 22/24
#   spoof types: 0.9, 0.45, 0.35 are Photo (1); 0.8, 0.7 Poster (2); 0.65 A4 (3)
#     -> APCER Photo = 2/3, Poster = 0, A4 = 0; worst = Photo
LIVE = [0.1, 0.3, 0.6, 0.2]
SPOOF = [0.9, 0.8, 0.7, 0.65, 0.45, 0.35]
SCORES = np.array(LIVE + SPOOF)
LABELS = np.array([0] * 4 + [1] * 6)
TYPES = np.array([0, 0, 0, 0, 1, 2, 2, 3, 1, 1])


def test_confusion_counts_spoof_positive():
    assert confusion(SCORES, LABELS, 0.5) == {"tp": 4, "fn": 2, "fp": 1, "tn": 3}


def test_worked_example_rates():
    m = compute_metrics(SCORES, LABELS, threshold=0.5)
    assert (m["n"], m["n_live"], m["n_spoof"]) == (10, 4, 6)
    assert m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["apcer"] == pytest.approx(2 / 6)
    assert m["bpcer"] == pytest.approx(1 / 4)
    assert m["acer"] == pytest.approx(7 / 24)
    assert m["auc"] == pytest.approx(22 / 24)


def test_paper_formula_columns_are_the_swapped_pair():
    m = compute_metrics(SCORES, LABELS, threshold=0.5)
    # Paper (2): FP/(FP+TN) = 1/4; paper (3): FN/(FN+TP) = 2/6.
    assert m["apcer_paper_formula"] == pytest.approx(1 / 4)
    assert m["bpcer_paper_formula"] == pytest.approx(2 / 6)
    assert m["apcer_paper_formula"] != pytest.approx(m["apcer"])
    assert (m["apcer_paper_formula"] + m["bpcer_paper_formula"]) / 2 == pytest.approx(m["acer"])


def test_threshold_is_inclusive():
    # A spoof scored exactly at the threshold is caught; a live one is rejected.
    m = compute_metrics([0.5, 0.5], [0, 1], threshold=0.5)
    assert m["apcer"] == 0.0 and m["bpcer"] == 1.0


def test_auc_perfect_inverted_and_random():
    y = np.array([0, 0, 0, 1, 1, 1])
    assert auc([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], y) == 1.0
    assert auc([0.7, 0.8, 0.9, 0.1, 0.2, 0.3], y) == 0.0
    assert auc(np.full(6, 0.4), y) == 0.5  # a constant scorer: all pairs tied
    rng = np.random.default_rng(0)
    y_big = rng.integers(0, 2, 20000)
    assert auc(rng.random(20000), y_big) == pytest.approx(0.5, abs=0.02)


def test_auc_ties_count_half():
    # live 0.2, 0.5; spoof 0.5, 0.8: pairs win 1 (0.5>0.2) + 0.5 (tie) + 2 (0.8 beats both) = 3.5 of 4.
    assert auc([0.2, 0.5, 0.5, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)


def test_auc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.6 + 0.4 * y, 1)  # coarse rounding forces ties
    live, spoof = s[y == 0], s[y == 1]
    diff = spoof[:, None] - live[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert auc(s, y) == pytest.approx(expected)


def test_eer_worked_example():
    # t     FPR (live>=t)  FNR (spoof<t)  |diff|
    # 0.35  1/4            0              1/4
    # 0.45  1/4            1/6            1/12   <- tie on |diff| with 0.6, lower FPR+FNR wins
    # 0.6   1/4            2/6            1/12
    # 0.65  0              2/6            1/3
    value, thr = eer_point(SCORES, LABELS)
    assert thr == pytest.approx(0.45)
    assert value == pytest.approx((1 / 4 + 1 / 6) / 2)
    assert eer(SCORES, LABELS) == value and eer_threshold(SCORES, LABELS) == thr
    m = compute_metrics(SCORES, LABELS)
    assert (m["eer"], m["eer_threshold"]) == (value, thr)


def test_eer_threshold_reproduces_rates_when_applied():
    scores = [0.1, 0.2, 0.3, 0.4, 0.6, 0.35, 0.7, 0.8, 0.9, 0.95]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    value, thr = eer_point(scores, labels)
    assert thr == pytest.approx(0.6) and value == pytest.approx(0.2)  # FPR = FNR = 1/5
    m = compute_metrics(scores, labels, threshold=thr)
    assert m["apcer"] == pytest.approx(0.2) and m["bpcer"] == pytest.approx(0.2)


def test_eer_tie_prefers_lower_total_error_not_lower_threshold():
    # live 0.1 0.2 0.6 0.6, spoof 0.3 0.8 0.9 0.95:
    #   t = 0.6: FPR 2/4, FNR 1/4 (|diff| 1/4, sum 3/4);  t = 0.8: FPR 0, FNR 1/4 (|diff| 1/4, sum 1/4)
    value, thr = eer_point([0.1, 0.2, 0.6, 0.6, 0.3, 0.8, 0.9, 0.95], [0, 0, 0, 0, 1, 1, 1, 1])
    assert thr == pytest.approx(0.8) and value == pytest.approx(0.125)


def test_eer_perfect_separation_is_zero():
    value, thr = eer_point([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert value == 0.0 and thr == pytest.approx(0.8)


def test_tpr_at_fpr():
    # FPR 0 needs t above the highest live score 0.6 -> lowest such candidate 0.65 catches 4 of 6 spoofs.
    assert tpr_at_fpr(SCORES, LABELS, 1e-2) == (pytest.approx(4 / 6), pytest.approx(0.65))
    # FPR <= 1/4 allows t = 0.35: one live (0.6) rejected, every spoof caught.
    assert tpr_at_fpr(SCORES, LABELS, 0.25) == (pytest.approx(1.0), pytest.approx(0.35))
    assert tpr_at_fpr(SCORES, LABELS, 0.24)[0] == pytest.approx(4 / 6)
    m = compute_metrics(SCORES, LABELS)
    assert m["tpr@fpr=1e-2"] == m["tpr@fpr=5e-3"] == m["tpr@fpr=1e-3"] == pytest.approx(4 / 6)


def test_tpr_at_fpr_on_large_sample_respects_target():
    rng = np.random.default_rng(2)
    y = np.array([0] * 5000 + [1] * 5000)
    s = np.concatenate([rng.normal(0, 1, 5000), rng.normal(2, 1, 5000)])
    tpr, thr = tpr_at_fpr(s, y, 1e-2)
    fpr = np.mean(s[y == 0] >= thr)
    assert fpr <= 1e-2
    assert tpr == pytest.approx(np.mean(s[y == 1] >= thr))
    # The next lower live score as threshold would break the target, so thr is the tightest one.
    lower = np.max(s[(y == 0) & (s < thr)])
    assert np.mean(s[y == 0] >= lower) > 1e-2
    # Gaussian separation 2: TPR at FPR 1% is about 1 - Phi(2.326 - 2) = 0.37.
    assert 0.3 < tpr < 0.45


def test_apcer_per_type_and_worst():
    per_type, worst = apcer_per_type(SCORES, LABELS, TYPES, 0.5)
    assert per_type == {"Photo": pytest.approx(2 / 3), "Poster": 0.0, "A4": 0.0}
    assert worst == "Photo"
    m = compute_metrics(SCORES, LABELS, 0.5, spoof_types=TYPES, type_names={1: "print", 2: "poster", 3: "a4"})
    assert m["apcer_per_type"] == {"print": pytest.approx(2 / 3), "poster": 0.0, "a4": 0.0}
    assert m["worst_type"] == "print"


def test_apcer_per_type_ties_and_unknown_names():
    # Two types each with one of two attacks missed: tie goes to the lower code; unnamed code -> str.
    scores = [0.1, 0.9, 0.2, 0.9, 0.2]
    labels = [0, 1, 1, 1, 1]
    types = [0, 7, 7, 42, 42]
    per_type, worst = apcer_per_type(scores, labels, types, 0.5)
    assert per_type == {"PC": 0.5, "42": 0.5}
    assert worst == "PC"


def test_errors_per_group_counts_by_hand():
    # The worked example split over subjects "10", "3" and "x": live 0.6 (rejected) is subject 3's,
    # attacks 0.45 and 0.35 (accepted) are subject 10's and x's; subject x has no live item.
    groups = ["3", "3", "3", "10", "3", "10", "10", "10", "10", "x"]
    rows = errors_per_group(SCORES, LABELS, groups, 0.5)
    assert [r["group"] for r in rows] == ["3", "10", "x"]  # natural order
    by = {r["group"]: r for r in rows}
    assert (by["3"]["n_live"], by["3"]["live_rejected"], by["3"]["n_spoof"], by["3"]["attacks_accepted"]) == (3, 1, 1, 0)
    assert (by["10"]["n_live"], by["10"]["live_rejected"], by["10"]["n_spoof"], by["10"]["attacks_accepted"]) == (1, 0, 4, 1)
    assert by["3"]["bpcer"] == pytest.approx(1 / 3) and by["10"]["apcer"] == 0.25
    assert by["x"]["attacks_accepted"] == 1 and by["x"]["apcer"] == 1.0 and math.isnan(by["x"]["bpcer"])
    assert sum(r["live_rejected"] for r in errors_per_group(SCORES, LABELS, groups, 0.0)) == 4  # all live rejected
    with pytest.raises(ValueError, match="one entry per item"):
        errors_per_group(SCORES, LABELS, groups[:-1])


def test_no_spoof_types_gives_empty():
    m = compute_metrics(SCORES, LABELS)
    assert m["apcer_per_type"] == {} and m["worst_type"] is None


def test_one_class_batches_give_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_spoof = compute_metrics([0.9, 0.2, 0.8], [1, 1, 1], spoof_types=[1, 1, 2])
        only_live = compute_metrics([0.1, 0.7], [0, 0], spoof_types=[0, 0])
    assert only_spoof["apcer"] == pytest.approx(1 / 3)
    assert only_spoof["accuracy"] == pytest.approx(2 / 3)
    assert only_spoof["worst_type"] == "Photo"
    assert only_live["bpcer"] == 0.5
    assert only_live["apcer_per_type"] == {} and only_live["worst_type"] is None
    for m, undefined in ((only_spoof, "bpcer"), (only_live, "apcer")):
        for key in (undefined, "acer", "auc", "eer", "eer_threshold", "tpr@fpr=1e-2"):
            assert math.isnan(m[key]), key
    # The paper-formula pair is the swapped one, so the undefined rate moves column.
    assert math.isnan(only_spoof["apcer_paper_formula"]) and math.isnan(only_live["bpcer_paper_formula"])


def test_labels_may_be_bool_or_float():
    a = compute_metrics(SCORES, LABELS)
    b = compute_metrics(SCORES, LABELS.astype(bool))
    c = compute_metrics(list(SCORES), [float(v) for v in LABELS])
    for key in ("apcer", "bpcer", "auc", "eer"):
        assert a[key] == b[key] == c[key]


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [0, 1, 1], "differ in length"),
        ([0.1, 0.2], [0, 2], "labels must be 0"),
        ([0.1, float("nan")], [0, 1], "finite"),
        ([0.1, float("inf")], [0, 1], "finite"),
        ([], [], "empty"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
        ([0.1, 0.2], ["live", "spoof"], "labels must be 0"),
    ],
)
def test_bad_input_raises_clear_value_error(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(scores, labels)


def test_bad_spoof_types_and_target():
    with pytest.raises(ValueError, match="spoof_types"):
        compute_metrics(SCORES, LABELS, spoof_types=[1, 2])
    with pytest.raises(ValueError, match="target_fpr"):
        tpr_at_fpr(SCORES, LABELS, 1.5)
    with pytest.raises(ValueError, match="threshold"):
        compute_metrics(SCORES, LABELS, threshold=float("nan"))


def test_selection_key_breaks_acer_ties_by_loss_and_ranks_undefined_last():
    epochs = {1: {"acer": 0.0, "loss": 0.30}, 2: {"acer": 0.0, "loss": 0.05}, 3: {"acer": 0.01, "loss": 0.01},
              4: {"acer": float("nan"), "loss": 0.0}}
    assert min(epochs, key=lambda e: selection_key(epochs[e])) == 2
    assert selection_key({"acer": float("nan")}) == (float("inf"), float("inf"))
    assert selection_key({"acer": 0.1}) < selection_key({"acer": float("nan"), "loss": 0.0})
