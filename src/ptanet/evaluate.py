"""Paper Table 3: test quality of the baseline and every requested PTA configuration.

Each row is measured at the fixed threshold 0.5 and at the EER threshold chosen on the
validation split (never on test). A PTA model with stored per-configuration BatchNorm
statistics is reported both with them ("recalibrated", the default) and with the single set
that training left ("shared", exactly the paper's procedure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ptanet.checkpoint import load_checkpoint
from ptanet.data import CropDataset, Preprocess
from ptanet.engine import load_data, predict, resolve_settings
from ptanet.metrics import compute_metrics, eer_threshold, errors_per_group
from ptanet.models import config_label, is_pta, parse_configs
from ptanet.tables import to_markdown, write_table

TABLE3_COLUMNS = [
    ("model", "Configuration", "str"),
    ("accuracy", "Accuracy (%)", "pct"),
    ("apcer", "APCER (%)", "pct"),
    ("bpcer", "BPCER (%)", "pct"),
    ("acer", "ACER (%)", "pct"),
    ("auc", "AUC", "f3"),
    ("apcer_paper_formula", "APCER, paper formula (%)", "pct"),
    ("bpcer_paper_formula", "BPCER, paper formula (%)", "pct"),
]
ALL_COLUMNS = [
    ("model", "model", "str"), ("config", "config", "str"), ("bn", "bn", "str"), ("split", "split", "str"),
    ("threshold_rule", "threshold_rule", "str"), ("threshold", "threshold", "f3"),
    *TABLE3_COLUMNS[1:], ("eer", "eer", "pct"), ("tpr@fpr=1e-2", "tpr@fpr=1e-2", "pct"),
    ("worst_type", "worst_type", "str"), ("n", "n", "int"), ("checkpoint", "checkpoint", "str"),
]
PER_SUBJECT_COLUMNS = [
    ("model", "Configuration", "str"), ("bn", "BN", "str"), ("threshold_rule", "Threshold", "str"),
    ("subject", "Subject", "str"), ("n_live", "Live", "int"), ("live_rejected", "Live rejected", "int"),
    ("bpcer", "BPCER (%)", "pct"), ("n_spoof", "Attacks", "int"), ("attacks_accepted", "Attacks accepted", "int"),
    ("apcer", "APCER (%)", "pct"),
]


SPLITS = {"test": "Test", "val": "Validation"}


def evaluate_checkpoints(checkpoints: Iterable[str | Path], configs: Iterable[str] | None = None, data: str | None = None,
                         bn_recalibration: bool = True, progress: bool = True, log=print,
                         split: str = "test") -> list[dict[str, Any]]:
    """Table 3 rows for each checkpoint: the baseline gives one model row, a PTA model one per
    configuration (and BN mode); each at threshold 0.5 and at the validation EER threshold.

    The data (root, split, cache) are those the checkpoint was trained with, unless ``data`` names
    another root. ``split="val"`` measures the validation part instead of test, for comparing ideas
    without looking at test (its "eer@val" rows then use a threshold chosen on the data measured).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    configs = parse_configs(None) if configs is None else list(configs)
    rows: list[dict[str, Any]] = []
    for path in checkpoints:
        ck = load_checkpoint(path)
        settings = dict(ck.meta.get("settings", {}))
        if data:
            settings["data"] = data
        if not settings.get("data"):
            raise ValueError(f"{path}: the checkpoint names no data set; pass --data")
        caches = load_data(resolve_settings(**settings), progress)
        if split not in caches:
            raise ValueError(f"{settings['data']}: no {split} split to evaluate on")
        preprocess = Preprocess.from_dict(ck.preprocess)
        val, measured = (CropDataset(caches[p], preprocess) for p in ("val", split))
        model = ck.model
        variants: list[tuple[str | None, str]] = [(None, "n/a")]
        if is_pta(model):
            bn_modes = ["recalibrated", "shared"] if bn_recalibration and model.bn_configs else ["shared"]
            # Recalibrated rows first, with the stored statistics; then the paper's rows without them.
            variants = [(c, bn) for bn in bn_modes for c in configs]
        for config, bn in variants:
            if config is not None:
                if bn == "shared":
                    model.clear_bn_stats()
                elif config not in model.bn_configs:
                    log(f"{path}: no BatchNorm statistics stored for {config}; its 'recalibrated' row uses the shared ones")
                model.set_config(config)
            val_scores, _ = predict(model, val)
            scores = val_scores if split == "val" else predict(model, measured)[0]
            threshold_eer = eer_threshold(val_scores, val.labels)
            for rule, threshold in (("0.5", 0.5), ("eer@val", threshold_eer)):
                m = compute_metrics(scores, measured.labels, threshold=threshold,
                                    spoof_types=caches[split].spoof_types[measured.indices])
                subjects = [caches[split].subjects[i] for i in measured.indices]
                per_subject = errors_per_group(scores, measured.labels, subjects, threshold)
                rows.append({"model": config_label(config), "config": config, "bn": bn, "split": split, "threshold_rule": rule,
                             "checkpoint": str(path), **m, "threshold": threshold, "per_subject": per_subject})
            log(f"{config_label(config)} ({bn} BN): {split} ACER {100 * rows[-2]['acer']:.2f}% at 0.5, "
                f"{100 * rows[-1]['acer']:.2f}% at the validation EER threshold")
    return rows


def select(rows: list[dict], threshold_rule: str = "0.5", bn: str | None = None) -> list[dict]:
    """Rows of one threshold rule; for PTA rows one BN mode (default: recalibrated if present)."""
    picked = [r for r in rows if r["threshold_rule"] == threshold_rule]
    modes = {r["bn"] for r in picked if r["config"]}
    bn = bn or ("recalibrated" if "recalibrated" in modes else "shared")
    return [r for r in picked if r["config"] is None or r["bn"] == bn]


def table3_markdown(rows: list[dict]) -> str:
    """Table 3 in sections: per-configuration BN (if any), the paper's shared BN, and EER thresholds."""
    sections = []
    modes = {r["bn"] for r in rows if r["config"]}
    split = SPLITS[rows[0].get("split", "test")] if rows else SPLITS["test"]
    for bn in [m for m in ("recalibrated", "shared") if m in modes] or ["shared"]:
        for rule, rule_text in (("0.5", "threshold 0.5"), ("eer@val", "threshold = EER point on validation")):
            picked = select(rows, rule, bn)
            if picked:
                bn_text = {"recalibrated": "per-configuration BatchNorm statistics",
                           "shared": "shared BatchNorm statistics (paper)"}[bn]
                sections.append(f"### {split}, {rule_text}, {bn_text}\n\n{to_markdown(picked, TABLE3_COLUMNS)}")
    note = ("APCER = attacks accepted as live / attacks, BPCER = live rejected / live (ISO/IEC 30107-3, the paper's "
            "text). The paper's formulas (2)-(3) swap the two; the 'paper formula' columns follow them for comparison.")
    return "\n\n".join(sections) + "\n\n" + note + "\n"


def per_subject_rows(rows: list[dict]) -> list[dict]:
    """One row per Table 3 row and subject of the measured split: live rejected and attacks accepted."""
    return [{"model": r["model"], "config": r["config"], "bn": r["bn"], "split": r["split"],
             "threshold_rule": r["threshold_rule"], "threshold": r["threshold"], "checkpoint": r["checkpoint"],
             "subject": g["group"], **{k: v for k, v in g.items() if k != "group"}}
            for r in rows for g in r.get("per_subject", [])]


def write_table3(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """table3.md (sections as above), table3.json and table3.csv (every row and column), and
    per_subject.md (threshold 0.5, as Table 3's first section), .json and .csv (every row)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_table(rows, ALL_COLUMNS, out_dir / "table3")
    paths["md"].write_text(table3_markdown(rows))
    subject_paths = write_table(per_subject_rows(rows), PER_SUBJECT_COLUMNS, out_dir / "per_subject")
    subject_paths["md"].write_text(to_markdown(per_subject_rows(select(rows, "0.5")), PER_SUBJECT_COLUMNS) + "\n")
    paths.update({f"per_subject_{k}": p for k, p in subject_paths.items()})
    return paths
