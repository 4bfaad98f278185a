"""Cross-validation by subject: quality numbers that hold on people no model has seen.

The training subjects are dealt into k folds (every person in exactly one fold, folds balanced for
live and spoof images). For each fold a model is trained with ``ptanet train``'s own settings on the
other people (its validation part, and so its best epoch, comes from those people too), then scores
the fold's images: every training image is scored by a model that never saw its person. Reported per
configuration: mean and standard deviation over folds (and seeds) of ACER at 0.5, EER and AUC, and
the same metrics on the pooled out-of-fold scores, with the threshold at the pooled EER point and
the ACER each fold gets at that threshold.

The pooled out-of-fold scores also give each configuration a decision threshold chosen on people not
in training (``target``: the EER point, or ``apcer=X`` / ``bpcer=X`` as ``ptanet calibrate``);
:func:`cv_threshold` turns them into the per-configuration record of ``ptanet.threshold``, which
``ptanet train --threshold-from OUT`` and ``ptanet cv --final`` (a final model trained on every
subject) store with the model.

``transfer``: another data root in CelebA-Spoof layout (e.g. a set of ``ptanet synth``, whose screen
replays a print-only real set lacks) whose test split every fold model also scores; reported per
configuration and attack group (screen replays, prints and others) over folds: AUC against the set's
live faces and the APCER at the pooled threshold, with the live faces' BPCER (``OUT/transfer.*``).

Each fold is its own run folder (``OUT/seed<S>/fold<K>``, resumable like any training run) plus its
out-of-fold scores (``oof.json``, written atomically when the fold is done), so an interrupted
cross-validation continues with the first unfinished fold.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm.auto import tqdm

from ptanet.atomic import write_json_atomic
from ptanet.calibrate import parse_target, pick_threshold, store_threshold
from ptanet.checkpoint import load_checkpoint
from ptanet.configs import config_label
from ptanet.data import CropDataset
from ptanet.data.cache import CropCache, prepare_cache
from ptanet.data.dataset import MIX_PREFIX, MIX_SPOOF_TYPES, load_items
from ptanet.metrics import compute_metrics
from ptanet.preprocess import Preprocess
from ptanet.scoring import score_configs
from ptanet.tables import write_table
from ptanet.train.loop import train
from ptanet.train.settings import TrainSettings, load_data

OOF_NAME = "oof.json"
CV_COLUMNS = [
    ("model", "Configuration", "str"),
    ("acer_mean", "ACER at 0.5 (%)", "pct"), ("acer_std", "sd", "pct"),
    ("eer_mean", "EER (%)", "pct"), ("eer_std", "sd", "pct"),
    ("auc_mean", "AUC", "f3"), ("auc_std", "sd", "f3"),
    ("oof_acer", "pooled ACER at 0.5 (%)", "pct"), ("oof_eer", "pooled EER (%)", "pct"), ("oof_auc", "pooled AUC", "f3"),
    ("oof_threshold", "pooled threshold", "f3"), ("threshold_rule", "rule", "str"),
    ("acer_at_oof_mean", "ACER at pooled threshold (%)", "pct"), ("acer_at_oof_std", "sd", "pct"),
    ("n_folds", "folds", "int"),
]


def subject_folds(subjects: Iterable[str], labels: Iterable[int], k: int = 4, seed: int = 0) -> list[list[str]]:
    """Deal subjects into ``k`` folds, each person in exactly one, balancing live and spoof counts.

    Largest subjects first (ties in seeded random order), each to the fold whose live and spoof counts,
    as shares of the totals, are lowest after adding it: a greedy balance that is deterministic for a
    seed. Raises when there are fewer subjects than folds.
    """
    subjects, labels = list(subjects), np.asarray(list(labels), dtype=np.int64)
    people = sorted(set(subjects))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(people) < k:
        raise ValueError(f"cannot make {k} subject folds from {len(people)} subjects")
    counts = {p: np.zeros(2) for p in people}
    for subject, label in zip(subjects, labels):
        counts[subject][label] += 1
    totals = np.maximum(sum(counts.values()), 1)
    order = np.random.default_rng(seed).permutation(len(people))
    people = sorted((people[i] for i in order), key=lambda p: -counts[p].sum())  # stable: ties stay shuffled
    folds: list[list[str]] = [[] for _ in range(k)]
    load = np.zeros((k, 2))
    for person in people:
        empty = [i for i in range(k) if not folds[i]]  # every fold gets someone first
        candidates = empty or range(k)
        best = min(candidates, key=lambda i: (((load[i] + counts[person]) / totals).max(), i))
        folds[best].append(person)
        load[best] += counts[person]
    return [sorted(f) for f in folds]


def fold_settings(settings: TrainSettings, out: Path, seed: int, fold: int, holdout: list[str]) -> TrainSettings:
    return dataclasses.replace(settings, out=str(out / f"seed{seed}" / f"fold{fold}"), seed=seed,
                               holdout_subjects=holdout)


TRANSFER_COLUMNS = [
    ("model", "Configuration", "str"), ("group", "Attacks", "str"), ("n_spoof", "attacks", "int"),
    ("n_live", "live", "int"),
    ("auc_mean", "AUC", "f3"), ("auc_std", "sd", "f3"),
    ("apcer_mean", "APCER at pooled threshold (%)", "pct"), ("apcer_std", "sd", "pct"),
    ("bpcer_mean", "BPCER of its live at pooled threshold (%)", "pct"), ("bpcer_std", "sd", "pct"),
]


def attack_group(spoof_type: int) -> str:
    return "screen replay" if spoof_type in MIX_SPOOF_TYPES else "print and other"


def transfer_cache(settings: TrainSettings, root: str | Path, preprocess: Preprocess, progress: bool) -> CropCache:
    """The crop cache of ``root``'s test split, beside the run's own caches."""
    loaded = load_items(root, "test", "celeba")
    if not loaded.items:
        raise ValueError(f"{root}: no usable test items ({loaded.summary()})")
    folder = Path(settings.cache_dir) / f"transfer+{Path(root).name}" / "test"
    return CropCache(prepare_cache(loaded.items, folder, preprocess, workers=settings.prepare_workers,
                                   progress=progress).cache_dir)


def _score_transfer(checkpoint, settings: TrainSettings, root, configs, progress: bool) -> dict[str, Any]:
    ck = load_checkpoint(checkpoint)
    cache = transfer_cache(settings, root, Preprocess.from_dict(ck.preprocess), progress)
    scores = score_configs(ck.model, CropDataset(cache, Preprocess.from_dict(ck.preprocess)), configs)
    return {"root": str(root), "labels": cache.labels.tolist(), "spoof_types": cache.spoof_types.tolist(),
            "scores": {config_label(c): s.tolist() for c, (s, _) in scores.items()}}


def run_fold(settings: TrainSettings, configs: list[str], progress: bool = True, log=print,
             transfer: str | Path | None = None) -> dict[str, Any]:
    """Train one fold (resuming its run folder) and score its held-out people (and ``transfer``'s
    test split); returns the record written to ``oof.json``: per configuration the scores, with labels
    and subjects."""
    run = Path(settings.out)
    done = run / OOF_NAME
    if done.is_file():
        record = json.loads(done.read_text())
        if transfer is not None and (record.get("transfer") or {}).get("root") != str(transfer):
            record["transfer"] = _score_transfer(run / "best.pt", settings, transfer, configs, progress)
            write_json_atomic(done, record)
        return record
    result = train(settings, resume=(run / "last.pt").exists(), progress=progress, log=log)
    data = load_data(settings, progress=False)
    ck = load_checkpoint(result.best_checkpoint)
    held = CropDataset(data["holdout"], Preprocess.from_dict(ck.preprocess))
    scores = score_configs(ck.model, held, configs)
    record = {"holdout_subjects": settings.holdout_subjects, "rels": data["holdout"].rels,
              "labels": held.labels.tolist(), "subjects": data["holdout"].subjects,
              "scores": {config_label(c): s.tolist() for c, (s, _) in scores.items()},
              "best_epoch": result.best_epoch}
    if transfer is not None:
        record["transfer"] = _score_transfer(result.best_checkpoint, settings, transfer, configs, progress)
    write_json_atomic(done, record)
    return record


def cross_validate(settings: TrainSettings, out: str | Path, k: int = 4, seeds: Iterable[int] = (0,),
                   configs: Iterable[str] | None = None, progress: bool = True, log=print,
                   target: str = "eer", only: Iterable[int] | None = None,
                   transfer: str | Path | None = None) -> dict[str, Any]:
    """Run (or continue) a k-fold subject cross-validation of ``settings`` for each seed; write
    ``OUT/cv.md/json/csv`` (one row per configuration, pooled threshold by ``target``) and
    ``OUT/oof_scores.json``; return both.

    ``only``: train just these fold numbers (0-based, of every seed), so that several processes or
    machines can share the folds; the summary is written by whichever call finds every fold done
    (otherwise ``rows`` is None and ``pending`` lists the folds still to train)."""
    parse_target(target)  # a bad target fails before hours of training
    from ptanet.configs import parse_configs

    out = Path(out)
    configs = parse_configs(configs)
    seeds = list(seeds)
    # One crop cache for every fold and seed (by default beside the cross-validation folder).
    settings = dataclasses.replace(settings, cache=str(settings.cache_dir))
    whole = load_data(settings, progress)  # the train list, cached once for every fold and seed
    if transfer is not None:  # cached now too, not by parallel processes at the end of their first folds
        transfer_cache(settings, transfer, settings.preprocess, progress)
    # The real people only: the synthetic images of a --mix-synth are training data of every fold.
    people = [(subject, label) for part in ("train", "val")
              for subject, label in zip(whole[part].subjects, whole[part].labels.tolist())
              if not subject.startswith(MIX_PREFIX)]
    folds_per_seed = {s: subject_folds([p for p, _ in people], [y for _, y in people], k, s) for s in seeds}
    write_json_atomic(out / "folds.json", {str(s): f for s, f in folds_per_seed.items()}, indent=2)
    jobs = [(s, i, fold) for s in seeds for i, fold in enumerate(folds_per_seed[s])]
    chosen = set(range(k) if only is None else only)
    if not chosen <= set(range(k)):
        raise ValueError(f"folds {sorted(chosen - set(range(k)))} do not exist; folds are numbered 0-{k - 1}")
    for s, i, fold in tqdm([j for j in jobs if j[1] in chosen], desc="cross-validation folds", disable=not progress):
        log(f"== seed {s}, fold {i + 1}/{k}: holding out {', '.join(fold)}")
        run_fold(fold_settings(settings, out, s, i, fold), configs, progress, log, transfer)
    done = {(s, i): Path(fold_settings(settings, out, s, i, fold).out) / OOF_NAME for s, i, fold in jobs}
    pending = [f"seed {s} fold {i}" for (s, i), path in done.items() if not path.is_file()]
    if pending:
        log(f"cross-validation of {out}: {len(pending)} of {len(jobs)} folds still to train ({', '.join(pending)})")
        return {"rows": None, "records": None, "pending": pending}
    # Finished folds read back (run_fold adds the transfer scores where a fold was trained without them).
    records = [{"seed": s, "fold": i, **run_fold(fold_settings(settings, out, s, i, fold), configs, progress, log,
                                                transfer)} for s, i, fold in jobs]
    rows = summarize(records, target)
    write_table(rows, CV_COLUMNS, out / "cv")
    transfer_rows = summarize_transfer(records, rows) if transfer is not None else []
    if transfer_rows:
        write_table(transfer_rows, TRANSFER_COLUMNS, out / "transfer")
    write_json_atomic(out / "oof_scores.json", records)
    return {"rows": rows, "records": records, "pending": [], "transfer_rows": transfer_rows}


def summarize(records: list[dict], target: str = "eer") -> list[dict[str, Any]]:
    """Per configuration: fold metrics' mean and sd, pooled out-of-fold metrics, and the ACER per fold
    at the pooled threshold for ``target`` (the threshold a deployment takes from cross-validation)."""
    rows = []
    for model in records[0]["scores"]:
        per_fold = [compute_metrics(r["scores"][model], r["labels"], 0.5) for r in records]
        scores = np.concatenate([r["scores"][model] for r in records])
        labels = np.concatenate([r["labels"] for r in records])
        pooled = compute_metrics(scores, labels, 0.5)
        threshold = pick_threshold(scores, labels, target)
        at_oof = [compute_metrics(r["scores"][model], r["labels"], threshold)["acer"] for r in records]
        row: dict[str, Any] = {"model": model, "n_folds": len(records), "oof_threshold": threshold,
                               "threshold_rule": target.strip().lower(),
                               "oof_acer": pooled["acer"], "oof_eer": pooled["eer"], "oof_auc": pooled["auc"]}
        for key in ("acer", "eer", "auc"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_sd([m[key] for m in per_fold])
        row["acer_at_oof_mean"], row["acer_at_oof_std"] = _mean_sd(at_oof)
        rows.append(row)
    return rows


def summarize_transfer(records: list[dict], rows: list[dict]) -> list[dict[str, Any]]:
    """Per configuration and attack group of the transfer set: AUC against its live faces, and APCER
    and the live faces' BPCER at the pooled out-of-fold threshold of ``rows``, as mean and sd over folds."""
    out = []
    for row in rows:
        model, threshold = row["model"], row["oof_threshold"]
        groups: dict[str, list[dict]] = {}
        for r in records:
            t = r["transfer"]
            scores, labels, types = (np.asarray(t["scores"][model]), np.asarray(t["labels"]),
                                     np.asarray(t["spoof_types"]))
            live, group_of = labels == 0, np.array([attack_group(int(k)) for k in types])
            for group in sorted(set(group_of[~live])):
                keep = live | (group_of == group)
                m = compute_metrics(scores[keep], labels[keep], threshold)
                groups.setdefault(group, []).append(m)
        for group, metrics in groups.items():
            entry: dict[str, Any] = {"model": model, "group": group, "n_spoof": metrics[0]["n_spoof"],
                                     "n_live": metrics[0]["n_live"]}
            for key in ("auc", "apcer", "bpcer"):
                entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_sd([m[key] for m in metrics])
            out.append(entry)
    return out


def cv_threshold(cv_dir: str | Path, target: str = "eer", select: str = "HHH") -> dict[str, Any]:
    """The per-configuration threshold record (``ptanet.threshold``) from a cross-validation folder's
    pooled out-of-fold scores: each configuration's threshold for ``target``; ``value`` (used by
    configurations the record does not list) is ``select``'s, or the baseline's."""
    path = Path(cv_dir) / "oof_scores.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no out-of-fold scores (run ptanet cv --out {cv_dir} first, to the end)")
    try:
        records = json.loads(path.read_text())
        labels = np.concatenate([r["labels"] for r in records])
        per_config = {model.removeprefix("PTA-"): pick_threshold(np.concatenate([r["scores"][model] for r in records]),
                                                                labels, target)
                      for model in records[0]["scores"]}
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not the out-of-fold scores of ptanet cv ({type(exc).__name__}: {exc})") from None
    value = per_config.get(select, per_config.get("No PTA", next(iter(per_config.values()))))
    return {"value": value, "per_config": per_config, "rule": target.strip().lower(),
            "data": f"out-of-fold scores of {Path(cv_dir)}", "n": int(len(labels)),
            "folds": len(records)}


def store_cv_threshold(checkpoint: str | Path, cv_dir: str | Path, target: str = "eer", log=print) -> dict[str, Any]:
    """Store :func:`cv_threshold` in ``checkpoint`` (atomically, in place); returns the record."""
    ck = load_checkpoint(checkpoint)  # refuses a foreign file before anything is written
    record = cv_threshold(cv_dir, target, select=ck.meta.get("settings", {}).get("select_config") or "HHH")
    if (ck.config is None) != ("No PTA" in record["per_config"]):
        kind = "the No PTA baseline" if ck.config is None else "a PTA model"
        raise ValueError(f"{checkpoint}: is {kind}, but {cv_dir} cross-validated "
                         f"{', '.join(record['per_config'])}; use the cross-validation of the same architecture")
    store_threshold(checkpoint, record)
    log(f"{checkpoint}: stored the {record['rule']} thresholds of {cv_dir} "
        + ", ".join(f"{c} {t:.3f}" for c, t in record["per_config"].items()))
    return record


def final_model(settings: TrainSettings, out: str | Path, target: str = "eer", progress: bool = True,
                log=print) -> dict[str, Any]:
    """``ptanet cv --final``: train on every training subject (``OUT/final``, its validation part as
    ``ptanet train`` makes it; resumable) and store the cross-validated thresholds in its best.pt."""
    out = Path(out)
    run = dataclasses.replace(settings, out=str(out / "final"), holdout_subjects=[])
    result = train(run, resume=(Path(run.out) / "last.pt").exists(), progress=progress, log=log)
    record = store_cv_threshold(result.best_checkpoint, out, target, log)
    return {"checkpoint": str(result.best_checkpoint), "best_epoch": result.best_epoch, "threshold": record}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    # A fold without one class has undefined rates (NaN); the mean is over the folds that have them.
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0
