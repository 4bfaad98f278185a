"""The paper's experiment end to end: train PTA and No PTA once each, evaluate every configuration,
and write Tables 3, 4, 5 and Figure 2. ``make demo`` runs it on the embedded synthetic set,
``make nuaa`` on the real nuaa-dev set.

Re-running it continues where it stopped: finished trainings are resumed (nothing left to do but
their BatchNorm recalibration) and cached crops are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ptanet.bench import COMPLEXITY_COLUMNS, LATENCY_COLUMNS, complexity_table, latency_table
from ptanet.evaluate import evaluate_checkpoints, write_table3
from ptanet.configs import parse_configs
from ptanet.report import write_report
from ptanet.tables import write_table
from ptanet.train.loop import train
from ptanet.train.settings import resolve_settings

# The paper's two models: PTA and the No PTA baseline (names from ptanet.models.MODELS).
ARCHS = ("pta_mobilenet_v2", "mobilenet_v2")

# The demo: the paper's recipe shortened to fit a few minutes on 2 CPU cores. A higher learning
# rate makes up for the few epochs; everything else (batch 32, Adam, 128x128, augmentations,
# Table 2 sampling, per-epoch validation, best epoch by HHH ACER) is the paper's.
# Validating HHH alone each epoch (Figure 2 needs only it) saves a minute.
DEMO_SETTINGS: dict[str, Any] = {"epochs": 8, "lr": 1e-3, "bn_images": 512, "val_configs": ["HHH"]}
DEMO_SYNTH: dict[str, Any] = {"n_subjects_train": 24, "n_subjects_test": 6, "images_per_subject": 50}


def run_experiment(data: str | Path, out: str | Path, overrides: dict[str, Any] | None = None, configs: list[str] | None = None,
                   latency_runs: int = 20, progress: bool = True, log=print, config_file: str | Path | None = None) -> dict[str, Path]:
    """Train both models on ``data`` into ``out/<arch>``, evaluate, and write the paper's tables.

    Settings: the paper's defaults, then ``config_file`` (YAML, e.g. ``recipes/nuaa_all_subjects.yaml``),
    then ``overrides``; both models get the same ones."""
    out = Path(out)
    configs = configs or parse_configs("paper")
    overrides = dict(overrides or {})
    timings: dict[str, float] = {}
    checkpoints = {}
    for arch in ARCHS:
        settings = resolve_settings(config_file, **{**overrides, "data": str(data), "out": str(out / arch), "arch": arch, "cache": str(out / "cache")})
        t0 = time.perf_counter()
        log(f"== training {arch} on {data} ({settings.epochs} epochs) -> {settings.out}")
        checkpoints[arch] = train(settings, resume=True, progress=progress, log=log).best_checkpoint
        timings[arch] = time.perf_counter() - t0

    log("== Table 4: complexity (ptflops) and CPU latency measured here")
    complexity = complexity_table(configs)
    latency = {r["model"]: r for r in latency_table(configs, runs=latency_runs)}
    for row in complexity:
        row.update({k: latency[row["model"]][k] for k in ("latency_ms", "relative_latency")})
    written = {f"table4.{k}": p for k, p in write_table(complexity, COMPLEXITY_COLUMNS + LATENCY_COLUMNS, out / "table4").items()}

    log("== Table 3: test quality per configuration")
    all_rows = []
    for arch, ckpt in checkpoints.items():
        rows = evaluate_checkpoints([ckpt], configs, progress=progress, log=log)
        write_table3(rows, out / arch / "eval")
        models = {r["model"] for r in rows}
        (out / arch / "complexity.json").write_text(json.dumps([r for r in complexity if r["model"] in models], indent=2))
        all_rows += rows
    written.update({f"table3.{k}": p for k, p in write_table3(all_rows, out).items()})

    log("== Table 5 and Figure 2")
    written.update(write_report([out / arch for arch in ARCHS], out))
    (out / "timings.json").write_text(json.dumps({"wall_seconds_per_model": timings}, indent=2))
    return written


def run_demo(out: str | Path = "runs/demo", progress: bool = True, log=print, **overrides: Any) -> dict[str, Path]:
    """The main job: write the synthetic set (once), then :func:`run_experiment` on it."""
    from ptanet.data.synth import ensure_synth

    out = Path(out)
    synth = ensure_synth(out / "data", **DEMO_SYNTH)
    log(f"synthetic data: {synth if synth is not None else 'reused ' + str(out / 'data')}")
    return run_experiment(out / "data", out, {**DEMO_SETTINGS, **overrides}, progress=progress, log=log)
