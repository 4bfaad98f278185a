"""Paper Table 3: test quality of the baseline and every requested PTA configuration.

Each Table 3 row is measured at the fixed threshold 0.5 and at the EER threshold chosen on a
validation part (never on test): the validation part of the data the checkpoint was trained on, so a
checkpoint can be measured on any labelled set, also one that has only a test split. A PTA model with
stored per-configuration BatchNorm statistics is reported both with them ("recalibrated", the
default) and with the single set that training left ("shared", exactly the paper's procedure).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from ptanet.checkpoint import load_checkpoint
from ptanet.configs import config_label, parse_configs
from ptanet.data import CropDataset, prepare_split
from ptanet.data.celeba import describe_parts
from ptanet.data.dataset import describe_data
from ptanet.metrics import compute_metrics, eer_threshold, errors_per_group
from ptanet.threshold import describe as describe_threshold, threshold_for
from ptanet.models import is_pta
from ptanet.preprocess import Preprocess
from ptanet.scoring import score_configs
from ptanet.tables import to_markdown, write_table
from ptanet.train.settings import load_data, resolve_settings


# --- paper Table 3 ---------------------------------------------------------------------------------
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
    ("threshold_from", "threshold_from", "str"),
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


def _measured_data(path: Path, preprocess: Preprocess, own, data: str | None, split: str, source: str | None,
                   cache: str | None, progress: bool, log=print) -> tuple[dict | None, Any, str]:
    """(the checkpoint's own caches or None, the cache to measure, the measured root); logs what was
    read and skipped, as training does."""
    own_root = own.data if own is not None else None
    foreign = data is not None and (own_root is None or Path(data).resolve() != Path(own_root))
    own_caches = None
    if own_root is not None and Path(own_root).exists():
        own_caches = load_data(own, progress)
        for line in describe_data(own_caches):
            log(line)
    if not foreign:
        if own_root is None:
            raise ValueError(f"{path}: the checkpoint names no data set; pass --data")
        if own_caches is None:
            raise FileNotFoundError(f"{own_root}: the data {path} was trained on is not here; pass --data")
        if split not in own_caches:
            raise ValueError(f"{own_root}: no {split} split to evaluate on")
        return own_caches, own_caches[split], own_root
    if split == "val":
        raise ValueError("--split val measures the validation part of the checkpoint's own data; leave out --data")
    settings = own if own is not None else resolve_settings()
    cache_dir = Path(cache) if cache else path.parent / "eval-cache" / f"{Path(data).resolve().name}-{split}"
    measured, loaded, report = prepare_split(data, cache_dir, split, preprocess,
                                             source=source or settings.source, protocol=settings.protocol,
                                             detect=settings.detect, workers=settings.prepare_workers,
                                             progress=progress)
    log(f"{split} list: {loaded.summary()}")
    log(f"{split} cache: {report.summary()}")
    return own_caches, measured, str(Path(data).resolve())


def evaluate_checkpoints(checkpoints: Iterable[str | Path], configs: Iterable[str] | None = None, data: str | None = None,
                         bn_recalibration: bool = True, progress: bool = True, log=print,
                         split: str = "test", source: str | None = None, cache: str | None = None) -> list[dict[str, Any]]:
    """Table 3 rows for each checkpoint: the baseline gives one model row, a PTA model one per
    configuration (and BN mode); each at threshold 0.5, at the validation EER threshold and, when the
    checkpoint stores one (``ptanet.threshold``), at its stored threshold (rule ``"stored"``). An
    exported model (``.onnx`` file or switchable folder) in ``checkpoints`` gets the same rows from
    onnxruntime, per configuration it holds (BN column "exported").

    The measured data is the checkpoint's own (the root, split and cache it was trained with) unless
    ``data`` names another root, whose ``split`` alone is read (``source`` its layout, default the
    checkpoint's; ``cache`` where its crops go). The EER threshold always comes from the validation
    part of the checkpoint's own data; when that data is not here, or its validation part lacks a
    class, only the 0.5 rows are written (and the log says why). ``split="val"`` measures that
    validation part itself, to compare ideas without looking at test.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    from ptanet.runtime import is_exported

    requested = None if configs is None else list(configs)
    configs = parse_configs(None) if configs is None else list(configs)
    rows: list[dict[str, Any]] = []
    for path in map(Path, checkpoints):
        if is_exported(path):  # an ONNX export: what a deployment runs
            rows += _evaluate_exported(path, requested, data, split, source, cache, progress, log)
            continue
        ck = load_checkpoint(path)
        stored = ck.meta.get("settings") or {}
        own = resolve_settings(**stored) if stored.get("data") else None
        preprocess = Preprocess.from_dict(ck.preprocess)
        own_caches, measured_cache, measured_root = _measured_data(path, preprocess, own, data, split, source, cache,
                                                                   progress, log)
        if split == "test":  # the validation part is described with the training data
            log(describe_parts({"test": (measured_cache.labels.tolist(), measured_cache.subjects)}))
        measured = CropDataset(measured_cache, preprocess)
        val = CropDataset(own_caches["val"], preprocess) if own_caches is not None else None
        threshold_from = f"validation part of {own.data}" if val is not None else None
        if val is None:
            log(f"{path}: its training data {own.data if own else '(not recorded)'} is not here, so there is no "
                "validation part to choose an EER threshold on; writing the threshold-0.5 rows only")
        model = ck.model
        bn_modes = ["n/a"]
        if is_pta(model):
            bn_modes = ["recalibrated", "shared"] if bn_recalibration and model.bn_configs else ["shared"]
            missing = [c for c in configs if c not in model.bn_configs]
            if "recalibrated" in bn_modes and missing:
                log(f"{path}: no BatchNorm statistics stored for {', '.join(missing)}; their 'recalibrated' rows "
                    "use the shared ones")
        # Recalibrated rows first, with the stored statistics; then the paper's rows without them.
        for bn in bn_modes:
            if bn == "shared":
                model.clear_bn_stats()
            measured_scores = score_configs(model, measured, configs)
            val_scores = (measured_scores if split == "val" else
                          score_configs(model, val, configs) if val is not None else {})
            for config, (scores, _) in measured_scores.items():
                thresholds = [("0.5", 0.5, "fixed")]
                if config in val_scores:
                    eer_at = eer_threshold(val_scores[config][0], val.labels)
                    if math.isnan(eer_at):
                        log(f"{path} {config_label(config)}: the validation part holds one class only, so it has "
                            "no EER point; writing the threshold-0.5 row only")
                    else:
                        thresholds.append(("eer@val", eer_at, threshold_from))
                stored_at = threshold_for(ck.meta.get("threshold"), config, str(path))
                if stored_at is not None:  # ptanet calibrate, or per configuration from cross-validation
                    thresholds.append(("stored", stored_at, describe_threshold(ck.meta["threshold"])))
                rows += _rows(path, config, bn, split, scores, measured, measured_cache, measured_root, thresholds, log)
    return rows


def _rows(path: Path, config: str | None, bn: str, split: str, scores, measured, measured_cache, measured_root: str,
          thresholds: list[tuple[str, float, str | None]], log=print) -> list[dict]:
    """One row per (rule, threshold, where it came from) of ``scores`` on ``measured``."""
    rows = []
    for rule, threshold, where in thresholds:
        m = compute_metrics(scores, measured.labels, threshold=threshold,
                            spoof_types=measured_cache.spoof_types[measured.indices])
        subjects = [measured_cache.subjects[i] for i in measured.indices]
        per_subject = errors_per_group(scores, measured.labels, subjects, threshold)
        rows.append({"model": config_label(config), "config": config, "bn": bn, "split": split,
                     "threshold_rule": rule, "checkpoint": str(path), "data": measured_root, **m,
                     "threshold": threshold, "threshold_from": where, "per_subject": per_subject})
    log(f"{config_label(config)} ({bn} BN): {split} ACER "
        + ", ".join(f"{100 * r['acer']:.2f}% at {r['threshold_rule']}" for r in rows))
    return rows


def exported_scores(model, crops, index=None, batch: int = 64):
    """Spoof scores of an exported model (``ptanet.runtime.DeployedModel``) on ``crops[index]`` (all
    of them without ``index``), read in batches so a memory-mapped crop cache is never loaded whole."""
    import numpy as np

    index = np.arange(len(crops)) if index is None else np.asarray(index)
    return np.concatenate([model.spoof_scores(np.ascontiguousarray(crops[index[i:i + batch]]))
                           for i in range(0, len(index), batch)]) if len(index) else np.zeros(0, np.float32)


def _evaluate_exported(path: Path, configs: list[str] | None, data: str | None, split: str, source: str | None,
                       cache: str | None, progress: bool, log=print) -> list[dict[str, Any]]:
    """Table 3 rows of an exported model (static file, switchable folder or file), per configuration
    it holds (or those of ``configs``). The graph holds the BatchNorm statistics it was exported with
    (rows "exported"); its metadata holds the checkpoint's training settings, whose data gives the
    default measured set and the validation part for the EER threshold when that data is here."""
    from ptanet.runtime import DeployedModel

    model = DeployedModel(path)
    preprocess = Preprocess.from_dict(model.meta["preprocess"])
    stored = model.meta.get("training") or {}
    own = resolve_settings(**stored) if isinstance(stored, dict) and stored.get("data") else None
    if own is None and data is None:
        raise ValueError(f"{path}: the model records no training data to measure on; pass --data")
    own_caches, measured_cache, measured_root = _measured_data(path, preprocess, own, data, split, source, cache,
                                                               progress, log)
    measured = CropDataset(measured_cache, preprocess)
    val = CropDataset(own_caches["val"], preprocess) if own_caches is not None else None
    held = model.config_names
    wanted = held if configs is None else [c or "No PTA" for c in configs]
    unknown = [c for c in wanted if c not in held]
    if unknown:
        raise ValueError(f"{path}: no configuration {', '.join(unknown)} in this model; it holds {', '.join(held)}")
    rows: list[dict[str, Any]] = []
    for name in wanted:
        model.set_config(name)
        config = model.config
        scores = exported_scores(model, measured_cache.crops, measured.indices)
        thresholds = [("0.5", 0.5, "fixed")]
        if val is not None:
            eer_at = eer_threshold(scores if split == "val" else exported_scores(model, val.cache.crops, val.indices),
                                   val.labels)
            if not math.isnan(eer_at):
                thresholds.append(("eer@val", eer_at, f"validation part of {own.data}"))
        stored_at = threshold_for(model.meta.get("threshold"), config, str(path))
        if stored_at is not None:
            thresholds.append(("stored", stored_at, describe_threshold(model.meta["threshold"])))
        rows += _rows(path, config, "exported", split, scores, measured, measured_cache, measured_root, thresholds, log)
    return rows


def select(rows: list[dict], threshold_rule: str = "0.5", bn: str | None = None) -> list[dict]:
    """Rows of one threshold rule; for PTA rows one BN mode (default: recalibrated if present)."""
    picked = [r for r in rows if r["threshold_rule"] == threshold_rule]
    modes = {r["bn"] for r in picked if r["config"]}
    bn = bn or next((m for m in ("recalibrated", "exported") if m in modes), "shared")
    return [r for r in picked if r["config"] is None or r["bn"] == bn]


def table3_markdown(rows: list[dict]) -> str:
    """Table 3 in sections: per-configuration BN (if any), the paper's shared BN, and EER thresholds."""
    sections = []
    modes = {r["bn"] for r in rows if r["config"]}
    # Several model files (say fp32 and INT8 exports of one configuration) give rows of the same name.
    columns = TABLE3_COLUMNS
    if len({r.get("checkpoint") for r in rows}) > 1:
        columns = [TABLE3_COLUMNS[0], ("checkpoint", "Model file", "str"), *TABLE3_COLUMNS[1:]]
    split = SPLITS[rows[0].get("split", "test")] if rows else SPLITS["test"]
    for bn in [m for m in ("recalibrated", "shared", "exported") if m in modes] or ["shared"]:
        for rule, rule_text in (("0.5", "threshold 0.5"), ("eer@val", "threshold = EER point on validation"),
                                ("stored", "threshold stored with the model")):
            picked = select(rows, rule, bn)
            if picked:
                bn_text = {"recalibrated": "per-configuration BatchNorm statistics",
                           "shared": "shared BatchNorm statistics (paper)",
                           "exported": "exported model (onnxruntime)"}[bn]
                where = sorted({r["threshold_from"] for r in picked if rule != "0.5"})
                source = f"\n\nThresholds chosen on the {'; '.join(where)}." if where else ""
                sections.append(f"### {split}, {rule_text}, {bn_text}{source}\n\n{to_markdown(picked, columns)}")
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
