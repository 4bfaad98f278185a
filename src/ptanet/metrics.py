"""Anti-spoofing metrics as pure functions of (scores, labels, threshold).

Conventions (the same everywhere in ptanet): label 0 = live (bona fide), 1 = spoof (attack); spoof is
the POSITIVE class. A score is the model's spoof score (softmax probability of class 1, though any
finite real works); an item is predicted spoof iff ``score >= threshold``.

Which rate is which. ISO/IEC 30107-3, and the paper's own text (Section 4), define

* APCER = attacks classified live / attacks        = FN / (FN + TP)
* BPCER = live classified spoof / live             = FP / (FP + TN)
* ACER  = (APCER + BPCER) / 2

where TP/TN/FP/FN are spoof-positive counts exactly as the paper defines them. The paper's formulas
(2) and (3), however, print APCER = FP/(FP+TN) and BPCER = FN/(FN+TP): with its own TP/FP definitions
that swaps the two. We follow the text (the standard); ``compute_metrics`` also returns the swapped pair
as ``apcer_paper_formula`` / ``bpcer_paper_formula`` so our numbers can be compared with whichever
reading produced the paper's Table 3. ACER is the same under both readings.

Threshold-free metrics: ``auc`` (Mann-Whitney with average ranks for ties), ``eer`` (at a real score
threshold, no interpolation, see ``eer_point``) and ``tpr_at_fpr`` (CelebA-Spoof benchmark, where
FPR = BPCER and TPR = 1 - APCER).

Undefined rates (e.g. BPCER of a batch without live images) are ``float('nan')``, never an exception
or a numpy warning, so a one-class batch can still be reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# CelebA-Spoof spoof-type label (label vector index 40), from the dataset's README.
CELEBA_SPOOF_TYPE_NAMES: dict[int, str] = {
    0: "Live",
    1: "Photo",
    2: "Poster",
    3: "A4",
    4: "Face Mask",
    5: "Upper Body Mask",
    6: "Region Mask",
    7: "PC",
    8: "Pad",
    9: "Phone",
    10: "3D Mask",
}

# FPR targets of the CelebA-Spoof benchmark, and the key each gets in compute_metrics' result.
TPR_AT_FPR_TARGETS: dict[str, float] = {
    "tpr@fpr=1e-2": 1e-2,
    "tpr@fpr=5e-3": 5e-3,
    "tpr@fpr=1e-3": 1e-3,
}

NAN = float("nan")


def _validate(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return (float scores, bool is_spoof); raise ValueError on anything a metric would silently misread."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("no items: scores and labels are empty")
    if not np.all(np.isfinite(s)):
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"scores must be finite; item {bad} is {s[bad]}")
    if y.dtype == bool:
        return s, y
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"labels must be 0 (live) or 1 (spoof), got dtype {y.dtype}")
    invalid = (y != 0) & (y != 1)
    if np.any(invalid):
        bad = int(np.flatnonzero(invalid)[0])
        raise ValueError(f"labels must be 0 (live) or 1 (spoof); item {bad} is {y[bad]}")
    return s, y == 1


def _ratio(num: int | float, den: int | float) -> float:
    """num/den, or nan when there is nothing to divide by (a rate over an empty class)."""
    return float(num) / float(den) if den else NAN


def _mean_or_nan(a: float, b: float) -> float:
    return NAN if (np.isnan(a) or np.isnan(b)) else (a + b) / 2.0


def confusion(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> dict[str, int]:
    """Spoof-positive confusion counts: tp = spoof caught, fn = spoof passed as live, fp = live rejected."""
    s, spoof = _validate(scores, labels)
    pred = s >= threshold
    return {
        "tp": int(np.sum(pred & spoof)),
        "fn": int(np.sum(~pred & spoof)),
        "fp": int(np.sum(pred & ~spoof)),
        "tn": int(np.sum(~pred & ~spoof)),
    }


def error_rates(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, APCER, BPCER, ACER at a threshold (ISO meanings), plus the paper-formula pair."""
    c = confusion(scores, labels, threshold)
    apcer = _ratio(c["fn"], c["fn"] + c["tp"])
    bpcer = _ratio(c["fp"], c["fp"] + c["tn"])
    return {
        "accuracy": _ratio(c["tp"] + c["tn"], sum(c.values())),
        "apcer": apcer,
        "bpcer": bpcer,
        "acer": _mean_or_nan(apcer, bpcer),
        # Formulas (2)-(3) of the paper, read literally: the two rates swapped.
        "apcer_paper_formula": bpcer,
        "bpcer_paper_formula": apcer,
    }


def auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC = P(spoof score > live score) + P(tie)/2, via Mann-Whitney U on average ranks; nan if one class."""
    s, spoof = _validate(scores, labels)
    n_spoof = int(spoof.sum())
    n_live = s.size - n_spoof
    if n_spoof == 0 or n_live == 0:
        return NAN
    # Average rank (1-based) of each distinct value: tied items share the mean of their positions.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum_spoof = float(avg_rank[inverse][spoof].sum())
    u = rank_sum_spoof - n_spoof * (n_spoof + 1) / 2.0
    return u / (n_spoof * n_live)


def _error_counts_at(s: np.ndarray, spoof: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer (false positives, false negatives) at each threshold: live >= t, spoof < t.

    Counts rather than rates so that ties between thresholds are compared exactly, not up to rounding.
    """
    live_sorted = np.sort(s[~spoof])
    spoof_sorted = np.sort(s[spoof])
    live_ge = live_sorted.size - np.searchsorted(live_sorted, thresholds, side="left")
    spoof_lt = np.searchsorted(spoof_sorted, thresholds, side="left")
    return live_ge.astype(np.int64), spoof_lt.astype(np.int64)


def _candidate_thresholds(s: np.ndarray) -> np.ndarray:
    """Every distinct score (ascending) plus one just above the maximum (= nothing predicted spoof)."""
    uniq = np.unique(s)
    return np.append(uniq, np.nextafter(uniq[-1], np.inf))


def eer_point(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """(EER, threshold): the real threshold where |FPR - FNR| is smallest, EER = (FPR + FNR) / 2 there.

    No interpolation between ROC points: the threshold is one a classifier can actually use, and applying
    it (``score >= threshold``) to the same data reproduces the rates the EER was taken from. Candidates are
    the distinct scores plus one value just above the largest. Ties in |FPR - FNR| go to the lower
    (FPR + FNR), then to the lower threshold. Both nan when a class is missing.
    """
    s, spoof = _validate(scores, labels)
    if spoof.all() or not spoof.any():
        return NAN, NAN
    n_spoof = int(spoof.sum())
    n_live = s.size - n_spoof
    thresholds = _candidate_thresholds(s)
    fp, fn = _error_counts_at(s, spoof, thresholds)
    # FPR - FNR and FPR + FNR scaled by n_live * n_spoof: exact integers. lexsort's last key is primary.
    diff = np.abs(fp * n_spoof - fn * n_live)
    total = fp * n_spoof + fn * n_live
    best = int(np.lexsort((thresholds, total, diff))[0])
    return float((fp[best] / n_live + fn[best] / n_spoof) / 2.0), float(thresholds[best])


def eer(scores: ArrayLike, labels: ArrayLike) -> float:
    """Equal error rate (see ``eer_point`` for how it is located)."""
    return eer_point(scores, labels)[0]


def eer_threshold(scores: ArrayLike, labels: ArrayLike) -> float:
    """Threshold at the EER: choose it on validation, then pass it as ``threshold`` on test."""
    return eer_point(scores, labels)[1]


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, target_fpr: float) -> tuple[float, float]:
    """(TPR, threshold): the highest TPR over ROC thresholds whose FPR <= target_fpr (nan if one class).

    TPR = spoof detected / spoof, FPR = live classified spoof / live (= BPCER). With fewer than
    1/target_fpr live items this means zero false positives, as it should.
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    s, spoof = _validate(scores, labels)
    if spoof.all() or not spoof.any():
        return NAN, NAN
    thresholds = _candidate_thresholds(s)
    fp, fn = _error_counts_at(s, spoof, thresholds)
    fpr, fnr = fp / np.sum(~spoof), fn / np.sum(spoof)
    # FPR falls as the threshold rises, so the lowest admissible threshold has the highest TPR.
    # The top candidate has FPR 0, so at least one is admissible.
    ok = np.flatnonzero(fpr <= target_fpr)
    best = int(ok[0])
    return float(1.0 - fnr[best]), float(thresholds[best])


def apcer_per_type(
    scores: ArrayLike,
    labels: ArrayLike,
    spoof_types: ArrayLike,
    threshold: float = 0.5,
    type_names: Mapping[Any, str] | None = None,
) -> tuple[dict[str, float], str | None]:
    """APCER of each attack type present among the spoof items, and the worst (highest-APCER) type.

    ISO/IEC 30107-3 reports the worst-case species because a system is as weak as its easiest attack.
    Types of live items are ignored. Names come from ``type_names`` (default: CelebA-Spoof's), falling
    back to ``str(code)``. Ties for worst go to the lowest type code. ``({}, None)`` without spoof items.
    """
    s, spoof = _validate(scores, labels)
    t = np.asarray(spoof_types)
    if t.shape != s.shape:
        raise ValueError(f"spoof_types must have one entry per item: {t.shape} vs {s.shape}")
    names = CELEBA_SPOOF_TYPE_NAMES if type_names is None else type_names
    per_type: dict[str, float] = {}
    worst: str | None = None
    for code in np.unique(t[spoof]):
        members = spoof & (t == code)
        key = code.item() if hasattr(code, "item") else code
        name = names.get(key, str(key))
        value = float(np.mean(s[members] < threshold))  # attacks passed as live
        per_type[name] = value
        if worst is None or value > per_type[worst]:
            worst = name
    return per_type, worst


def errors_per_group(scores: ArrayLike, labels: ArrayLike, groups: Sequence[Any],
                     threshold: float = 0.5) -> list[dict[str, Any]]:
    """Where the errors are: per group (e.g. test subject), how many live items were rejected and how
    many attacks accepted at a threshold, with the rates (nan for a class the group lacks).

    A few people can carry most of a small test set's errors, which one ACER hides. Groups come in
    natural order (subject "3" before "10").
    """
    s, spoof = _validate(scores, labels)
    g = np.asarray([str(v) for v in groups])
    if g.shape != s.shape:
        raise ValueError(f"groups must have one entry per item: {g.shape} vs {s.shape}")
    out = []
    for name in sorted(set(g.tolist()), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)):
        members = g == name
        live, attack = members & ~spoof, members & spoof
        rejected, accepted = int(np.sum(s[live] >= threshold)), int(np.sum(s[attack] < threshold))
        n_live, n_spoof = int(live.sum()), int(attack.sum())
        out.append({"group": name, "n_live": n_live, "live_rejected": rejected, "bpcer": _ratio(rejected, n_live),
                    "n_spoof": n_spoof, "attacks_accepted": accepted, "apcer": _ratio(accepted, n_spoof)})
    return out


def compute_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float = 0.5,
    spoof_types: ArrayLike | None = None,
    type_names: Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """Every metric ptanet reports, as one flat dict of fractions in [0, 1] (nan where undefined).

    Keys: n, n_live, n_spoof, threshold, accuracy, apcer, bpcer, acer, apcer_paper_formula,
    bpcer_paper_formula, auc, eer, eer_threshold, tpr@fpr=1e-2, tpr@fpr=5e-3, tpr@fpr=1e-3,
    apcer_per_type ({name: APCER}; {} when spoof_types is None), worst_type (None likewise).
    """
    if threshold is None or np.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold}")
    s, spoof = _validate(scores, labels)
    n_spoof = int(spoof.sum())
    result: dict[str, Any] = {
        "n": int(s.size),
        "n_live": int(s.size - n_spoof),
        "n_spoof": n_spoof,
        "threshold": float(threshold),
    }
    result.update(error_rates(s, spoof, threshold))
    result["auc"] = auc(s, spoof)
    result["eer"], result["eer_threshold"] = eer_point(s, spoof)
    for key, target in TPR_AT_FPR_TARGETS.items():
        result[key] = tpr_at_fpr(s, spoof, target)[0]
    if spoof_types is None:
        result["apcer_per_type"], result["worst_type"] = {}, None
    else:
        result["apcer_per_type"], result["worst_type"] = apcer_per_type(s, spoof, spoof_types, threshold, type_names)
    return result


def selection_key(val: dict) -> tuple[float, float]:
    """How epochs are ranked for "best": lower validation ACER, then lower validation loss.

    The loss breaks ties, which are common once a small validation set is classified perfectly;
    without it the first epoch to get there would win, however far from converged. A missing or
    undefined value ranks last.
    """
    def value(name: str) -> float:
        v = val.get(name)
        v = float("nan") if v is None else float(v)
        return float("inf") if math.isnan(v) else v

    return value("acer"), value("loss")
