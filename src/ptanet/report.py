"""Reports from training-run folders: paper Table 5, Figure 2 and a speed/quality plot.

A run folder (written by the trainer, read here):

* ``settings.json``: resolved settings, at least ``arch`` ("pta_mobilenet_v2" | "mobilenet_v2").
* ``history.jsonl``: one JSON object per epoch with ``epoch``, ``epoch_time_s`` and ``val`` =
  {configuration: {"accuracy", "apcer", "bpcer", "acer", ...}} (rates as fractions); the baseline's
  only configuration is "No PTA".
* ``complexity.json`` (optional): rows {model, config, params_m, mops}.
* ``eval/table3.json`` (optional): test rows {model, config, bn, threshold_rule, threshold, acer, ...}.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no
display or global backend state is touched.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ptanet.metrics import selection_key
from ptanet.tables import Column, write_table

ARCH_LABELS = {"mobilenet_v2": "MobileNetV2", "pta_mobilenet_v2": "MobileNetV2+PTA"}
BASELINE_CONFIG = "No PTA"
DEFAULT_PTA_CONFIG = "HHH"  # same parameters and multiply-adds as the baseline (paper, Section 5)

TABLE5_COLUMNS: list[Column] = [
    ("model", "Configuration", "str"),
    ("epoch_time_min", "Epoch Training Time (m)", "f2"),
    ("train_time_h", "Overall Training Time (h)", "f2"),
    ("epoch_time_median_min", "Median Epoch Time (m)", "f2"),
    ("best_accuracy", "Best Accuracy (%)", "pct"),
    ("best_acer", "Best ACER (%)", "pct"),
    ("best_epoch", "Best epoch", "int"),
    ("epochs", "Epochs", "int"),
    ("val_config", "Validated on", "str"),
]


@dataclass
class Run:
    """One training run folder, parsed."""

    path: Path
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    complexity: list[dict[str, Any]] | None = None
    table3: list[dict[str, Any]] | None = None

    @property
    def arch(self) -> str:
        return self.settings["arch"]

    @property
    def is_pta(self) -> bool:
        return self.arch == "pta_mobilenet_v2"

    @property
    def label(self) -> str:
        return ARCH_LABELS[self.arch]

    def val_key(self, config: str = DEFAULT_PTA_CONFIG) -> str:
        """Key of the validated configuration in ``history[i]["val"]``: ``config`` for PTA, "No PTA" otherwise."""
        return config if self.is_pta else BASELINE_CONFIG

    def val_series(self, config: str = DEFAULT_PTA_CONFIG) -> list[tuple[int, dict[str, Any]]]:
        """(epoch, validation metrics) of the selection configuration, for epochs that validated it."""
        key = self.val_key(config)
        series = [(int(h["epoch"]), h["val"][key]) for h in self.history if key in (h.get("val") or {})]
        if self.history and not series:
            raise ValueError(f"{self.path / 'history.jsonl'}: no epoch has validation results for {key!r}")
        return series


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _read_history(path: Path) -> list[dict[str, Any]]:
    """Parse history.jsonl; a broken *last* line is what a killed run leaves, so it is dropped with a warning."""
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    history = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if pos == len(lines) - 1:
                warnings.warn(f"{path}:{lineno}: ignoring truncated last line (run killed mid-write?)", stacklevel=3)
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or "epoch" not in record:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with an 'epoch' key")
        history.append(record)
    return history


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder; errors name the missing or broken file."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root}")
    required = {name: root / name for name in ("settings.json", "history.jsonl")}
    for path in required.values():
        if not path.is_file():
            raise FileNotFoundError(f"missing run file: {path}")
    settings = _read_json(required["settings.json"])
    if not isinstance(settings, dict) or settings.get("arch") not in ARCH_LABELS:
        raise ValueError(f"{required['settings.json']}: 'arch' must be one of {sorted(ARCH_LABELS)}")
    optional: dict[str, list[dict[str, Any]] | None] = {}
    for name, rel in (("complexity", "complexity.json"), ("table3", "eval/table3.json")):
        path = root / rel
        rows = _read_json(path) if path.is_file() else None
        if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
            raise ValueError(f"{path}: expected a JSON list of objects")
        optional[name] = rows
    return Run(root, settings, _read_history(required["history.jsonl"]), **optional)


def _as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def table5(runs: Iterable[Run], config: str = DEFAULT_PTA_CONFIG) -> list[dict[str, Any]]:
    """Rows of paper Table 5: training time per epoch (minutes, mean) and overall (hours, sum), best quality.

    Best accuracy and best ACER are both taken at ONE epoch: the one with the lowest validation ACER
    of the selection configuration (``config`` for PTA runs, "No PTA" for the baseline; ties go to
    the lower validation loss, as in training: ``metrics.selection_key``), i.e. the checkpoint one would select. They are validation numbers, so they will
    not match the paper's PTA row, which quotes the best *test* values over all configurations of
    Table 3 (accuracy from LLL, ACER from BBB). Missing values are nan.
    """
    rows = []
    for run in runs:
        times = [float(h["epoch_time_s"]) for h in run.history if h.get("epoch_time_s") is not None]
        series = [(e, v) for e, v in run.val_series(config) if not math.isnan(_as_float(v.get("acer")))]
        best_epoch, best = min(series, key=lambda ev: selection_key(ev[1])) if series else (None, {})
        rows.append(
            {
                "model": run.label,
                "run": run.path.name,
                "val_config": run.val_key(config),
                "epochs": len(run.history),
                "epoch_time_min": sum(times) / len(times) / 60.0 if times else float("nan"),
                "train_time_h": sum(times) / 3600.0 if times else float("nan"),
                # The median resists epochs slowed by other work on a shared machine.
                "epoch_time_median_min": statistics.median(times) / 60.0 if times else float("nan"),
                "best_epoch": best_epoch,
                "best_accuracy": _as_float(best.get("accuracy")),
                "best_acer": _as_float(best.get("acer")),
            }
        )
    return rows


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=150)
    return out


def figure2(runs: Sequence[Run], out_png: str | Path, config: str = DEFAULT_PTA_CONFIG) -> Path:
    """Paper Figure 2: validation ACER (%) per epoch, No PTA solid blue vs PTA-<config> dashed orange."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    several = {arch: sum(r.arch == arch for r in runs) > 1 for arch in ARCH_LABELS}
    for run in runs:
        series = run.val_series(config)
        epochs = [e for e, _ in series]
        acer = [100.0 * _as_float(v.get("acer")) for _, v in series]
        if run.is_pta:
            style, label = dict(color="tab:orange", linestyle="--"), f"{run.label} (PTA-{config})"
        else:
            style, label = dict(color="tab:blue", linestyle="-"), f"{run.label} (No PTA)"
        if several[run.arch]:
            label += f" [{run.path.name}]"
        ax.plot(epochs, acer, marker="o", markersize=3, label=label, **style)
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Validation ACER (%)")
    ax.set_title(f"Validation ACER during training (PTA validated on PTA-{config})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, out_png)


def speed_quality_plot(rows: Sequence[dict[str, Any]], out_png: str | Path) -> Path:
    """Multiply-adds (Mops) vs test ACER (%), one annotated point per configuration: the trade-off PTA buys."""
    points = [
        (str(r["model"]), _as_float(r.get("mops")), 100.0 * _as_float(r.get("acer")))
        for r in rows
    ]
    points = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2])]
    if not points:
        raise ValueError("speed_quality_plot: no row has both a finite 'mops' and 'acer'")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for name, mops, acer in points:
        baseline = name == BASELINE_CONFIG
        ax.scatter(mops, acer, color="tab:blue" if baseline else "tab:orange", marker="s" if baseline else "o", zorder=3)
        ax.annotate(name, (mops, acer), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("Multiply-adds (Mops)")
    ax.set_ylabel("Test ACER (%)")
    ax.set_title("Speed / quality per configuration")
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    return _save(fig, out_png)


def _pick_table3_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Threshold 0.5 rows only; prefer recalibrated BN statistics, else shared; the baseline's rows
    (no PTA block, so no BN choice: bn "n/a") are taken as they are."""
    at_half = [r for r in rows if str(r.get("threshold_rule")) == "0.5"]
    for bn in ("recalibrated", "shared"):
        for r in at_half:
            if r.get("bn") == bn:
                return r
    return at_half[0] if at_half else None


def speed_quality_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """Join complexity rows with test rows by model name, over all runs (first run wins on duplicates).

    Joining across runs lets the baseline's numbers live in either run folder. Sorted by Mops.
    """
    complexity: dict[str, dict[str, Any]] = {}
    tests: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for r in run.complexity or []:
            complexity.setdefault(str(r["model"]), r)
        seen_here: dict[str, list[dict[str, Any]]] = {}
        for r in run.table3 or []:
            seen_here.setdefault(str(r["model"]), []).append(r)
        for model, model_rows in seen_here.items():
            tests.setdefault(model, model_rows)
    joined = []
    for model, c in complexity.items():
        t = _pick_table3_row(tests.get(model, []))
        if t is None:
            continue
        joined.append({**t, "model": model, "config": c.get("config"), "params_m": c.get("params_m"), "mops": c.get("mops")})
    return sorted(joined, key=lambda r: _as_float(r["mops"]))


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path, config: str = DEFAULT_PTA_CONFIG) -> dict[str, Path]:
    """Write table5.{md,json,csv}, figure2.png and, when test and complexity results exist, speed_quality.png."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("write_report: no run folders given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {f"table5.{ext}": p for ext, p in write_table(table5(runs, config), TABLE5_COLUMNS, out / "table5").items()}
    written["figure2.png"] = figure2(runs, out / "figure2.png", config)
    if any(r.complexity is not None and r.table3 is not None for r in runs):
        rows = speed_quality_rows(runs)
        if rows:
            written["speed_quality.png"] = speed_quality_plot(rows, out / "speed_quality.png")
        else:
            warnings.warn("speed_quality.png skipped: no model has both complexity and 0.5-threshold test rows", stacklevel=2)
    return written
