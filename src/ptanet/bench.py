"""Model complexity (paper Table 4): parameters, multiply-adds and measured latency per configuration.

Multiply-adds are counted with ptflops, the counter that reproduces the paper's numbers. ptflops
0.7.5 would count the global average pool twice (once as a module hook, once as a functional
call); our models pool functionally and we turn functional counting off, which gives the paper's
exact figures (e.g. 104.15 Mops for MobileNetV2 at 128x128).
"""

from __future__ import annotations

import statistics
import time
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ptanet.configs import PAPER_CONFIGS, config_label, parse_config
from ptanet.models import create_model, is_pta

COMPLEXITY_COLUMNS = [
    ("model", "Configuration", "str"),
    ("params_m", "# Params (M)", "f2"),
    ("mops", "Multiply-Adds (Mops)", "f2"),
]
LATENCY_COLUMNS = [
    ("latency_ms", "CPU latency (ms)", "f2"),
    ("relative_latency", "Relative latency", "f2"),
]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int = 128) -> int:
    """Multiply-adds of one forward pass on a ``3 x size x size`` image, as ptflops counts them."""
    from ptflops import get_model_complexity_info  # imported here: it is slow to import

    was_training = model.training
    model.eval()
    macs, _ = get_model_complexity_info(
        model,
        (3, size, size),
        as_strings=False,
        print_per_layer_stat=False,
        verbose=False,
        backend="pytorch",
        backend_specific_config={"count_functional": False},
    )
    model.train(was_training)
    return int(macs)


def _variants(configs: Iterable[str] | None, include_baseline: bool, **model_kwargs):
    """(config or None, static module) pairs: the baseline, then each PTA configuration."""
    if include_baseline:
        yield None, create_model("mobilenet_v2", **model_kwargs)
    pta = create_model("pta_mobilenet_v2", **model_kwargs)
    for cfg in configs if configs is not None else PAPER_CONFIGS:
        yield parse_config(cfg), pta.to_static(cfg)


def complexity_table(configs: Iterable[str] | None = None, size: int = 128, include_baseline: bool = True, **model_kwargs) -> list[dict]:
    """Rows of paper Table 4's first columns: parameters that the configuration actually uses
    (millions) and multiply-adds (millions), for the baseline and each configuration."""
    rows = []
    for cfg, model in _variants(configs, include_baseline, **model_kwargs):
        params, macs = count_params(model), count_macs(model, size)
        rows.append({"model": config_label(cfg), "config": cfg, "params": params, "params_m": params / 1e6, "macs": macs, "mops": macs / 1e6})
    return rows


@torch.inference_mode()
def measure_latency(model: nn.Module, size: int = 128, batch: int = 1, warmup: int = 10, runs: int = 50) -> dict:
    """Median and spread of the wall time of one forward pass (eval mode, CPU), after a warm-up."""
    model.eval()
    x = torch.randn(batch, 3, size, size)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4)
    return {"latency_ms": statistics.median(times), "latency_q1_ms": q[0], "latency_q3_ms": q[2], "runs": runs}


def latency_table(configs: Iterable[str] | None = None, size: int = 128, runs: int = 50, threads: int | None = 1, rounds: int = 3, **model_kwargs) -> list[dict]:
    """Paper Table 4's latency columns, measured here on the CPU with PyTorch.

    The baseline and every configuration are measured in the same process, interleaved over
    ``rounds`` so that drift of the machine hits all alike; the median over rounds is reported,
    with the ratio to the No PTA baseline (the paper's "Relative Inference Time").
    """
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        variants = list(_variants(configs, True, **model_kwargs))
        samples: dict[str, list[float]] = {config_label(c): [] for c, _ in variants}
        for _ in range(rounds):
            for cfg, model in variants:
                samples[config_label(cfg)].append(measure_latency(model, size, runs=runs)["latency_ms"])
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
    base = statistics.median(samples[config_label(None)])
    return [
        {
            "model": label,
            "latency_ms": statistics.median(v),
            "relative_latency": statistics.median(v) / base,
        }
        for label, v in samples.items()
    ]


# --- deployed-model benchmark (paper Table 4 per runtime) -----------------------------------------
BENCH_COLUMNS = [
    ("model", "Configuration", "str"),
    ("runtime", "Runtime", "str"),
    ("mops", "Multiply-Adds (Mops)", "f2"),
    ("median_ms", "Median (ms)", "f3"),
    ("p90_ms", "p90 (ms)", "f3"),
    ("relative", "Relative to No PTA", "f3"),
    ("p10_ms", "p10 (ms)", "f3"),
    ("relative_p10", "Relative to No PTA, p10", "f3"),
    ("throughput", "Batch-32 images/s", "f2"),
]


def environment(threads: int) -> dict:
    """CPU model, threads and library versions, recorded with every benchmark."""
    import platform

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": str(torch.__version__),
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def interleaved_timings(runners: dict[str, "callable"], runs: int = 300, rounds: int = 10, warmup: int = 20,
                        progress: bool = False) -> dict[str, list[float]]:
    """Wall times (ms) of ``runs`` calls of each runner, in ``rounds`` rounds that visit every runner
    in turn, so that drift of the machine (other processes, frequency) hits all of them alike."""
    per_round = max(1, -(-runs // rounds))
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds * len(runners), desc="timing", unit="model")
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - t0) * 1e3)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return samples


def _p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


BBB_VARIANT = "PTA-BBB (average as Mul)"


def _bench_models(checkpoint, configs: list[str], size: int, bbb_variant: bool = False):
    """(label, config, static torch module, preprocess, source for export) for No PTA and each
    configuration; with ``bbb_variant`` also BBB with its average as an explicit multiply
    (``to_static(fold_average=False)``, row :data:`BBB_VARIANT`), the graph the fold is measured against.

    Latency does not depend on the weights' values, so without a checkpoint (or for the No PTA row
    of a PTA checkpoint) a freshly initialised model of the same architecture is timed."""
    from ptanet.checkpoint import load_checkpoint
    from ptanet.preprocess import Preprocess

    if checkpoint is not None:
        ck = load_checkpoint(checkpoint)
        pta, preprocess = ck.model, ck.preprocess
        if not is_pta(pta):
            raise ValueError(f"{checkpoint}: ptanet bench needs a PTA checkpoint (its No PTA row is timed on a "
                             "fresh MobileNetV2)")
    else:
        pta, preprocess = create_model("pta_mobilenet_v2"), Preprocess(size=size).to_dict()
        ck = None
    yield "No PTA", None, create_model("mobilenet_v2").eval(), preprocess, None
    for cfg in configs:
        yield config_label(cfg), cfg, pta.to_static(cfg).eval(), preprocess, ck
    if bbb_variant and "BBB" in configs:
        yield BBB_VARIANT, "BBB", pta.to_static("BBB", fold_average=False).eval(), preprocess, ck


def benchmark(checkpoint=None, configs: Iterable[str] | None = None, runtimes: Iterable[str] = ("torch", "onnxruntime"),
              threads: int = 1, runs: int = 300, rounds: int = 10, warmup: int = 20, batch_runs: int = 10,
              size: int = 128, work_dir=None, int8_dir=None, bbb_variant: bool = True, progress: bool = True,
              optimization: str = "all") -> dict:
    """Batch-1 latency (median, p90 over ``runs`` timed calls after ``warmup``, interleaved over
    ``rounds``) and batch-32 throughput of No PTA and each configuration, per runtime: ``torch``
    (eager, the exported :class:`ptanet.export.Deployable` module), ``onnxruntime`` (its fp32 file),
    ``int8`` (the files of ``int8_dir``, from ``ptanet export --int8``). Relative latency is against
    No PTA in the same runtime and run; ``optimization``: onnxruntime's graph optimisation level
    (``ptanet.runtime.ortsession``). With ``bbb_variant``, BBB is also timed with its average as an
    explicit multiply (row :data:`BBB_VARIANT`). Returns ``{rows, environment}``."""
    import tempfile
    from pathlib import Path

    from ptanet.export import Deployable, _export_static, _source
    from ptanet.preprocess import Preprocess
    from ptanet.runtime import DeployedModel

    runtimes = list(runtimes)
    configs = [parse_config(c) for c in (configs if configs is not None else PAPER_CONFIGS)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="ptanet-bench-") if work_dir is None else None
    work = Path(work_dir or tmp.name)
    try:
        models = list(_bench_models(checkpoint, configs, size, bbb_variant))
        preprocess = Preprocess.from_dict(models[0][3])
        x1 = np.random.default_rng(0).integers(0, 256, (1, preprocess.size, preprocess.size, 3), dtype=np.uint8)
        x32 = np.random.default_rng(1).integers(0, 256, (32, preprocess.size, preprocess.size, 3), dtype=np.uint8)
        runners, batch_runners, meta = {}, {}, {}
        for label, cfg, module, prep, ck in models:
            macs = count_macs(module, preprocess.size)
            if "torch" in runtimes:
                wrapped = Deployable(module, Preprocess.from_dict(prep)).eval()
                t1, t32 = torch.from_numpy(x1), torch.from_numpy(x32)

                def eager(m=wrapped, t=t1):
                    with torch.inference_mode():
                        m(t)

                runners[(label, "torch")] = eager
                batch_runners[(label, "torch")] = lambda m=wrapped, t=t32: eager(m, t)
                meta[(label, "torch")] = (cfg, macs)
            if "onnxruntime" in runtimes:
                path = work / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.onnx"
                if not path.exists():
                    _export_static(module, cfg, _source(ck or module, prep), path, 17, True)
                runtime = DeployedModel(path, threads, optimization=optimization)
                runners[(label, "onnxruntime")] = lambda r=runtime: r.run(x1)
                batch_runners[(label, "onnxruntime")] = lambda r=runtime: r.run(x32)
                meta[(label, "onnxruntime")] = (cfg, macs)
            if "int8" in runtimes and int8_dir is not None and label != BBB_VARIANT:
                from ptanet.export import onnx_filename

                path = Path(int8_dir) / onnx_filename(cfg).replace(".onnx", ".int8.onnx")
                if path.exists():
                    runtime = DeployedModel(path, threads, optimization=optimization)
                    runners[(label, "int8")] = lambda r=runtime: r.run(x1)
                    batch_runners[(label, "int8")] = lambda r=runtime: r.run(x32)
                    meta[(label, "int8")] = (cfg, macs)
        keys = list(runners)
        named = {f"{k[0]}|{k[1]}": runners[k] for k in keys}
        samples = interleaved_timings(named, runs, rounds, warmup, progress)
        batch = interleaved_timings({f"{k[0]}|{k[1]}": batch_runners[k] for k in keys}, batch_runs,
                                    min(rounds, batch_runs), 2, progress)
    finally:
        torch.set_num_threads(previous)
        if tmp is not None:
            tmp.cleanup()
    rows = []
    for (label, rt) in keys:
        s = samples[f"{label}|{rt}"]
        cfg, macs = meta[(label, rt)]
        rows.append({"model": label, "config": cfg, "runtime": rt, "macs": macs, "mops": macs / 1e6,
                     "median_ms": statistics.median(s), "p90_ms": _p90(s), "runs": len(s),
                     # The fastest tenth: on a machine shared with other jobs, runs that were not
                     # preempted; the median there mixes in how often a run of that length is.
                     "p10_ms": float(np.percentile(s, 10)),
                     "throughput": 32e3 / statistics.median(batch[f"{label}|{rt}"])})
    for rt in {r["runtime"] for r in rows}:
        base = next((r for r in rows if r["runtime"] == rt and r["model"] == "No PTA"), None)
        for r in rows:
            if r["runtime"] == rt and base:
                r["relative"] = r["median_ms"] / base["median_ms"]
                r["relative_p10"] = r["p10_ms"] / base["p10_ms"]
    order = {"torch": 0, "onnxruntime": 1, "int8": 2}
    rows.sort(key=lambda r: (order.get(r["runtime"], 9), keys.index((r["model"], r["runtime"]))))
    return {"rows": rows, "environment": {**environment(threads), "ort_optimization": optimization}}


def speed_ratios(rows: list[dict]) -> list[dict]:
    """The issue's targets as ratios inside one run: ONNX Runtime vs eager, LLL/HHH/BBB vs No PTA."""
    def med(model, rt, key="median_ms"):
        return next((r[key] for r in rows if r["model"] == model and r["runtime"] == rt), None)

    out = []
    for key, what in (("median_ms", "median"), ("p10_ms", "p10")):
        out += _ratios(lambda m, rt: med(m, rt, key), rows, what)
    return out


def _ratios(med, rows: list[dict], what: str) -> list[dict]:
    out = []
    eager, ort_ = med("No PTA", "torch"), med("No PTA", "onnxruntime")
    if eager and ort_:
        out.append({"ratio": f"eager / ONNX Runtime, No PTA batch 1 ({what})", "value": eager / ort_, "target": ">= 3"})
    for cfg, target in (("LLL", "<= 0.85"), ("HHH", "<= 1.02"), ("BBB", "<= 1.15"), (BBB_VARIANT.removeprefix("PTA-"), "<= 1.15")):
        for rt in ("onnxruntime", "int8", "torch"):
            a, b = med(f"PTA-{cfg}", rt), med("No PTA", rt)
            if a and b:
                out.append({"ratio": f"{cfg} / No PTA, {rt} ({what})", "value": a / b, "target": target})
    for rt in ("int8",):
        for r in rows:
            if r["runtime"] == rt and r.get("config"):
                fp = med(r["model"], "onnxruntime")
                if fp:
                    out.append({"ratio": f"{r['config']} INT8 / fp32 ({what})", "value": med(r["model"], rt) / fp,
                                "target": "<= 0.7"})
    return out


def plot_latency_vs_macs(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rt in dict.fromkeys(r["runtime"] for r in rows):
        pts = [r for r in rows if r["runtime"] == rt]
        ax.scatter([r["mops"] for r in pts], [r["median_ms"] for r in pts], label=rt)
        for r in pts:
            ax.annotate(r["model"].replace("PTA-", ""), (r["mops"], r["median_ms"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("multiply-adds (M)")
    ax.set_ylabel("batch-1 latency, median (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the switchable artifact against its alternatives ------------------------------------------------
ARTIFACT_COLUMNS = [
    ("option", "Artifact", "str"),
    ("files", "Files", "int"),
    ("size_mb", "Size on disk (MB)", "f2"),
    ("rss_mb", "Resident memory, all configurations loaded (MB)", "f2"),
    ("switch_ms", "Switch cost (ms)", "f3"),
    ("worst_latency_ratio", "Worst latency vs static file", "f3"),
    ("latency_ratios", "Latency vs static file, per configuration", "str"),
]

# Runs in a fresh interpreter (onnxruntime + numpy only) so resident memory is that of the loaded
# sessions alone: load, run each configuration once, report VmRSS growth.
_RSS_SCRIPT = r"""
import json, sys, numpy as np
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024
import onnxruntime
from ptanet.runtime import DeployedModel, ortsession
before = rss()
paths, size = json.loads(sys.argv[1]), int(sys.argv[2])
x = np.zeros((1, size, size, 3), np.uint8)
for p in paths:
    m = DeployedModel(p)
    for c in m.config_names:
        m.set_config(c).run(x)
    globals().setdefault('keep', []).append(m)
print(rss() - before)
"""


def _rss_mb(paths: list[str], size: int) -> float:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, json.dumps(paths), str(size)], capture_output=True,
                         text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _switch_cost(model, configs: list[str], x: np.ndarray, switches: int = 120) -> float:
    """Median (first inference after a switch) minus median (a steady inference), ms."""
    first, steady = [], []
    for i in range(switches):
        model.set_config(configs[i % len(configs)])
        t0 = time.perf_counter()
        model.run(x)
        first.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        model.run(x)
        steady.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(first) - statistics.median(steady)


def compare_artifacts(checkpoint, configs: list[str] | None = None, threads: int = 1, runs: int = 300,
                      rounds: int = 10, work_dir=None) -> dict:
    """Size, resident memory, switch cost and per-configuration latency of (a) the switchable folder
    (one graph per configuration sharing one weights file), (b) the switchable file (If per
    configuration) and (b') its variant with every layer inside the ``If`` branches, against (c) the
    static files. Latency ratios are medians of interleaved runs in one process."""
    import tempfile
    from pathlib import Path

    from ptanet.export import (SWITCHABLE_DIR, SWITCHABLE_NAME, _source, export_all, export_switchable,
                               export_switchable_folder)
    from ptanet.preprocess import Preprocess
    from ptanet.runtime import DeployedModel, read_artifact

    configs = [parse_config(c) for c in (configs or PAPER_CONFIGS)]
    tmp = tempfile.TemporaryDirectory(prefix="ptanet-artifact-") if work_dir is None else None
    work = Path(work_dir or tmp.name)
    try:
        src = _source(checkpoint, None)
        size = Preprocess.from_dict(src.preprocess).size
        export_all(src.checkpoint or src.model, work / "static", configs)
        static = {c: work / "static" / f"model_{c}.onnx" for c in configs}
        sw_path = work / "switchable" / SWITCHABLE_NAME
        export_switchable(src.checkpoint or src.model, sw_path, configs)
        prefix_path = work / "own-prefix" / SWITCHABLE_NAME  # the variant export does not write
        export_switchable(src.checkpoint or src.model, prefix_path, configs, share_prefix=False)
        folder = work / "folder" / SWITCHABLE_DIR
        export_switchable_folder(src.checkpoint or src.model, folder, configs)
        shared_paths = [g for _, g in read_artifact(folder)]

        x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        switchable, sessions = DeployedModel(sw_path, threads), DeployedModel(folder, threads)
        prefixed = DeployedModel(prefix_path, threads)
        statics = {c: DeployedModel(static[c], threads) for c in configs}
        runners = {}
        for c in configs:
            runners[f"switchable|{c}"] = lambda c=c: switchable.set_config(c).run(x)
            runners[f"prefix|{c}"] = lambda c=c: prefixed.set_config(c).run(x)
            runners[f"shared|{c}"] = lambda c=c: sessions.set_config(c).run(x)
            runners[f"static|{c}"] = lambda c=c: statics[c].run(x)
        samples = interleaved_timings(runners, runs, rounds, 20)
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows = []
        for option, label, paths, model in (
                ("shared", f"switchable folder ({SWITCHABLE_DIR}/): one graph per configuration, one weights.bin",
                 shared_paths, sessions),
                ("switchable", f"switchable file ({SWITCHABLE_NAME} + weights): If per configuration", [sw_path],
                 switchable),
                ("prefix", "switchable file, every layer inside its If branch (share_prefix=False)", [prefix_path],
                 prefixed),
                ("static", f"{len(configs)} static files (reference)", list(static.values()), None)):
            where = paths[0].parent
            disk = sum(p.stat().st_size for p in where.iterdir() if p.name != "manifest.json")
            ratios = {c: med[f"{option}|{c}"] / med[f"static|{c}"] for c in configs}
            rows.append({
                "option": label, "files": sum(1 for p in where.iterdir() if p.name != "manifest.json"),
                "size_mb": disk / 1e6,
                "rss_mb": _rss_mb([str(p) for p in paths], size),
                "switch_ms": _switch_cost(model, configs, x) if model is not None else None,
                "worst_latency_ratio": max(ratios.values()) if option != "static" else 1.0,
                "latency_ratios": ", ".join(f"{c} {r:.3f}" for c, r in ratios.items()) if option != "static" else "",
                "latency_ms": {c: med[f"{option}|{c}"] for c in configs},
            })
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"rows": rows, "environment": environment(threads)}


# --- choosing a configuration --------------------------------------------------------------------------
SELECT_COLUMNS = [
    ("config", "Configuration", "str"),
    ("mops", "Multiply-Adds (Mops)", "f2"),
    ("latency_ms", "Latency (ms)", "f3"),
    ("acer", "Validation ACER (%)", "pct"),
    ("chosen", "Chosen", "str"),
]


def _quality(model_path, quality_json) -> dict[str, float]:
    """Validation ACER per configuration: from ``ptanet evaluate --split val``'s table3.json (its own
    BatchNorm statistics where rows have them, threshold 0.5), else what the model file recorded."""
    import json
    from pathlib import Path

    if quality_json:
        rows = json.loads(Path(quality_json).read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{quality_json}: expected the row list of ptanet evaluate's table3.json")
        best: dict[str, float] = {}
        for bn in ("shared", "recalibrated"):  # recalibrated rows, where present, override shared ones
            for r in rows:
                if r.get("config") and r.get("threshold_rule") == "0.5" and r.get("bn") == bn:
                    best[r["config"]] = r["acer"]
        return best
    path = Path(model_path)
    from ptanet.runtime import is_exported, read_metadata

    if is_exported(path):
        return {c["config"]: c["val"]["acer"] for c in read_metadata(path).get("configs", [])
                if c.get("config") and c.get("val")}
    from ptanet.checkpoint import load_checkpoint

    return {c: v["acer"] for c, v in (load_checkpoint(path).meta.get("val") or {}).items() if "acer" in v}


def selection_rows(model_path, configs: list[str], bench_json=None, runtime: str = "onnxruntime",
                   quality_json=None, runs: int = 100) -> list[dict]:
    """One row per configuration: multiply-adds, batch-1 latency (a bench JSON's rows for
    ``runtime``, or measured here) and validation ACER (None where not recorded)."""
    import json
    from pathlib import Path

    quality = _quality(model_path, quality_json)
    macs = {r["config"]: r["mops"] for r in complexity_table(configs, include_baseline=False)}
    if bench_json:
        try:
            data = json.loads(Path(bench_json).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{bench_json}: not a readable bench JSON ({exc})") from None
        rows = data if isinstance(data, list) else data.get("rows", [])
        latency = {r["config"]: r["median_ms"] for r in rows
                   if r.get("runtime") == runtime and r.get("config") and r["model"] == config_label(r["config"])}
    else:
        from ptanet.runtime import is_exported

        checkpoint = None if is_exported(model_path) else model_path
        measured = benchmark(checkpoint, configs, [runtime], runs=runs, rounds=5, bbb_variant=False, batch_runs=1)
        latency = {r["config"]: r["median_ms"] for r in measured["rows"] if r["config"]}
    missing = [c for c in configs if c not in latency]
    if missing:
        raise ValueError(f"{bench_json or 'the measurement'}: no {runtime} latency for {', '.join(missing)}; "
                         f"run ptanet bench --configs all --runtimes {runtime}")
    return [{"config": c, "mops": macs[c], "latency_ms": latency[c], "acer": quality.get(c)} for c in configs]


# --- the adaptive controller under changing load ------------------------------------------------------
ADAPTIVE_COLUMNS = [
    ("runner", "Runner", "str"),
    ("budget_ms", "Budget (ms)", "f3"),
    ("over_budget", "Frames over budget (%)", "pct"),
    ("over_budget_loaded", "Over budget while loaded (%)", "pct"),
    ("p90_ms", "p90 (ms)", "f3"),
    ("p90_loaded_ms", "p90 while loaded (ms)", "f3"),
    ("median_ms", "Median (ms)", "f3"),
    ("switches", "Switches", "int"),
]

_BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


class CPUBurner:
    """Busy-loop processes (one per core) that load the machine; each also stops by itself after
    ``max_seconds``, so a crashed benchmark cannot leave them running."""

    def __init__(self, processes: int | None = None, max_seconds: float = 120.0) -> None:
        import os

        self.n, self.max_seconds, self.procs = processes or os.cpu_count() or 1, max_seconds, []

    def start(self) -> None:
        import subprocess
        import sys

        self.procs = [subprocess.Popen([sys.executable, "-c", _BURN.format(seconds=self.max_seconds)])
                      for _ in range(self.n)]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)
        self.procs = []


def adaptive_benchmark(checkpoint, configs: list[str] | None = None, budget_ms: float | None = None,
                       frames: int = 3000, threads: int = 1, window: int = 15, plot=None, work_dir=None) -> dict:
    """Frames through the switchable folder, alternately by the adaptive controller and by fixed HHH,
    while a CPU burner runs during the middle third. The controller's ladder is the configurations
    no dearer than HHH (multiply-adds), cheapest first; the budget defaults to 1.3 x HHH's quiet
    90th percentile. Rows: share of frames over budget and p90, overall and while loaded, per runner."""
    import tempfile
    from pathlib import Path

    from ptanet.export import SWITCHABLE_DIR, export_switchable_folder
    from ptanet.runtime import AdaptiveController, DeployedModel

    configs = [parse_config(c) for c in (configs or PAPER_CONFIGS)]
    macs = {r["config"]: r["macs"] for r in complexity_table(sorted(set(configs) | {"HHH"}), include_baseline=False)}
    ladder = sorted((c for c in set(configs) | {"HHH"} if macs[c] <= macs["HHH"]), key=lambda c: macs[c])
    tmp = tempfile.TemporaryDirectory(prefix="ptanet-adaptive-") if work_dir is None else None
    work = Path(work_dir or tmp.name)
    # One busy process per core: a single one leaves a 1-thread model a core of its own, which loads nothing.
    burner = CPUBurner()
    try:
        path = work / SWITCHABLE_DIR
        export_switchable_folder(checkpoint, path, ladder)
        adaptive, fixed = DeployedModel(path, threads), DeployedModel(path, threads).set_config("HHH")
        size = adaptive.size
        x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        quiet = interleaved_timings({"HHH": lambda: fixed.run(x)}, 100, 1, 20)["HHH"]
        # 1.3 x HHH's quiet p90: with the controller's headroom (0.8) HHH then fits again once the load ends.
        budget = float(budget_ms or 1.3 * float(np.percentile(quiet, 90)))
        controller = AdaptiveController(ladder, [macs[c] for c in ladder], budget, window=window, start="HHH")
        timeline = {"adaptive": [], "fixed HHH": [], "config": [], "loaded": []}
        load_from, load_to = frames // 3, 2 * frames // 3
        for frame in range(frames):
            if frame == load_from:
                burner.start()
            elif frame == load_to:
                burner.stop()
            adaptive.set_config(controller.config)
            t0 = time.perf_counter()
            adaptive.run(x)
            t_adaptive = (time.perf_counter() - t0) * 1e3
            timeline["config"].append(controller.config)
            controller.observe(t_adaptive)
            t0 = time.perf_counter()
            fixed.run(x)
            timeline["fixed HHH"].append((time.perf_counter() - t0) * 1e3)
            timeline["adaptive"].append(t_adaptive)
            timeline["loaded"].append(load_from <= frame < load_to)
    finally:
        burner.stop()
        if tmp is not None:
            tmp.cleanup()
    loaded = np.asarray(timeline["loaded"])
    rows = []
    for runner in ("adaptive", "fixed HHH"):
        t = np.asarray(timeline[runner])
        switches = sum(a != b for a, b in zip(timeline["config"], timeline["config"][1:])) if runner == "adaptive" else 0
        rows.append({"runner": runner, "budget_ms": budget, "over_budget": float(np.mean(t > budget)),
                     "over_budget_loaded": float(np.mean(t[loaded] > budget)), "p90_ms": _p90(list(t)),
                     "p90_loaded_ms": _p90(list(t[loaded])), "median_ms": float(np.median(t)), "switches": switches})
    if plot:
        _plot_adaptive(timeline, ladder, budget, plot)
    return {"rows": rows, "ladder": ladder, "budget_ms": budget, "frames": frames, "load_frames": [load_from, load_to],
            "timeline": timeline, "environment": environment(threads)}


def _plot_adaptive(timeline: dict, ladder: list[str], budget: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    frames = np.arange(len(timeline["adaptive"]))
    ax.plot(frames, timeline["fixed HHH"], lw=0.6, label="fixed HHH", color="tab:red")
    ax.plot(frames, timeline["adaptive"], lw=0.6, label="adaptive", color="tab:blue")
    ax.axhline(budget, color="k", ls="--", lw=1, label=f"budget {budget:.2f} ms")
    loaded = np.flatnonzero(timeline["loaded"])
    if len(loaded):
        ax.axvspan(loaded[0], loaded[-1], color="0.9", label="CPU burner running")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper right")
    ax2.step(frames, [ladder.index(c) for c in timeline["config"]], where="post")
    ax2.set_yticks(range(len(ladder)), ladder)
    ax2.set_xlabel("frame")
    ax2.set_ylabel("configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- exported models on a checkpoint's test split -------------------------------------------------------
INT8_COLUMNS = [
    ("model", "Configuration", "str"),
    ("acer_fp32", "Test ACER fp32 (%)", "pct"),
    ("acer_int8", "Test ACER INT8 (%)", "pct"),
    ("acer_change_points", "ACER change (points)", "f2"),
    ("mean_abs_diff", "Mean |dP| vs fp32", "f3"),
    ("max_abs_diff", "Max |dP| vs fp32", "f3"),
    ("label_agreement", "Labels equal (%)", "pct"),
    ("latency_ratio", "INT8 / fp32 latency", "f3"),
]


def evaluate_exported(model_path, checkpoint, split: str = "test", configs: list[str] | None = None,
                      threshold: float = 0.5) -> list[dict]:
    """Metrics (``ptanet.metrics.error_rates``) of an exported file, per configuration it holds, on
    the ``split`` crop cache ("test" or "train") of the data ``checkpoint`` was trained on."""
    from pathlib import Path

    from ptanet.checkpoint import load_checkpoint
    from ptanet.checkpoint import Checkpoint
    from ptanet.data import CropCache
    from ptanet.evaluate import exported_scores
    from ptanet.metrics import error_rates
    from ptanet.runtime import DeployedModel
    from ptanet.train.settings import resolve_settings

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    settings = ck.meta.get("settings")
    if not settings:
        raise ValueError(f"{checkpoint}: no training settings stored, so its {split} crops are unknown")
    cache = CropCache(Path(resolve_settings(**settings).cache_dir) / split)
    model = DeployedModel(model_path)
    rows = []
    for config in configs or model.config_names:
        model.set_config(config)
        scores = exported_scores(model, cache.crops)
        rows.append({"config": model.config, "model": config_label(model.config), "n": len(scores),
                     **error_rates(scores, cache.labels, threshold)})
    return rows


def int8_report(checkpoint, folder, configs: list[str], runs: int = 200, rounds: int = 5) -> list[dict]:
    """Per configuration: test ACER of ``model_<C>.onnx`` and ``model_<C>.int8.onnx`` in ``folder``
    (ptanet export --int8), their parity on the INT8 file's metadata, and batch-1 latency ratio."""
    import json
    from pathlib import Path

    import onnx

    from ptanet.export import INT8_SUFFIX, onnx_filename
    from ptanet.runtime import DeployedModel

    folder = Path(folder)
    rows, runners = [], {}
    x = None
    for c in configs:
        fp32, int8 = folder / onnx_filename(c), folder / onnx_filename(c).replace(".onnx", INT8_SUFFIX)
        a = evaluate_exported(fp32, checkpoint)[0]
        b = evaluate_exported(int8, checkpoint)[0]
        m32, m8 = DeployedModel(fp32), DeployedModel(int8)
        if x is None:
            x = np.random.default_rng(0).integers(0, 256, (1, m32.size, m32.size, 3), dtype=np.uint8)
        runners[f"{c}|fp32"], runners[f"{c}|int8"] = (lambda m=m32: m.run(x)), (lambda m=m8: m.run(x))
        props = {p.key: p.value for p in onnx.load(int8, load_external_data=False).metadata_props}
        rows.append({"config": c, "model": config_label(c), "acer_fp32": a["acer"], "acer_int8": b["acer"],
                     "acer_change_points": 100 * (b["acer"] - a["acer"]), "n_test": a["n"],
                     **json.loads(props.get("int8_parity", "{}"))})
    samples = interleaved_timings(runners, runs, rounds, 20)
    for r in rows:
        r["latency_ratio"] = statistics.median(samples[f"{r['config']}|int8"]) / statistics.median(samples[f"{r['config']}|fp32"])
    return rows


INT8_OPTION_COLUMNS = [
    ("model", "Configuration", "str"),
    ("options", "Quantization", "str"),
    ("mean_abs_diff", "Mean |dP| vs fp32", "f3"),
    ("max_abs_diff", "Max |dP| vs fp32", "f3"),
    ("label_agreement", "Labels equal (%)", "pct"),
    ("latency_ratio", "INT8 / fp32 latency", "f3"),
]
# The kept settings (export.INT8_OPTIONS) first, then each with one thing changed.
INT8_VARIANTS = [
    {"per_channel": True, "activation": "U8", "weight": "S8", "reduce_range": False, "stem_fp32": True},
    {"per_channel": True, "activation": "U8", "weight": "S8", "reduce_range": False, "stem_fp32": False},
    {"per_channel": False, "activation": "U8", "weight": "S8", "reduce_range": False, "stem_fp32": True},
    {"per_channel": True, "activation": "S8", "weight": "S8", "reduce_range": False, "stem_fp32": True},
    {"per_channel": True, "activation": "U8", "weight": "S8", "reduce_range": True, "stem_fp32": True},
    {"per_channel": True, "activation": "U8", "weight": "S8", "reduce_range": False, "stem_fp32": True,
     "depthwise_fp32": True},
    {"per_channel": True, "activation": "U8", "weight": "S8", "reduce_range": False, "stem_fp32": True,
     "quant_format": "QOperator"},
]


def int8_options(checkpoint, configs: list[str], runs: int = 200, rounds: int = 5) -> list[dict]:
    """Each quantization variant of :data:`INT8_VARIANTS` per configuration: parity against fp32 on
    real crops the calibration did not see, and batch-1 latency against fp32 (interleaved)."""
    import tempfile
    from pathlib import Path

    from ptanet.export import _source, _static_module, _export_static, int8_crops, quantize_int8
    from ptanet.runtime import DeployedModel

    src = _source(checkpoint, None)
    calibration, check, where = int8_crops(src)
    rows, runners = [], {}
    with tempfile.TemporaryDirectory(prefix="ptanet-int8opt-") as tmp:
        for c in configs:
            module, c = _static_module(src.model, c)
            fp32 = Path(tmp) / f"{c}.onnx"
            _export_static(module, c, src, fp32, 17, True, crops=(check, where))
            m32 = DeployedModel(fp32)
            x = check[:1]
            runners[f"{c}|fp32"] = lambda m=m32: m.run(x)
            for k, v in enumerate(INT8_VARIANTS):
                r = quantize_int8(fp32, Path(tmp) / f"{c}.{k}.onnx", calibration, check, tolerance=1.0, **v)
                m8 = DeployedModel(r["path"])
                runners[f"{c}|{k}"] = lambda m=m8: m.run(x)
                name = (f"{'per-channel' if v['per_channel'] else 'per-tensor'}, {v['activation']}{v['weight']}"
                        f"{', reduce_range' if v['reduce_range'] else ''}"
                        f"{', first convolution fp32' if v.get('stem_fp32') else ', all convolutions INT8'}"
                        f"{', depthwise convolutions fp32' if v.get('depthwise_fp32') else ''}"
                        f"{', QOperator format' if v.get('quant_format') == 'QOperator' else ''}")
                rows.append({"config": c, "model": config_label(c), "variant": k, "options": name,
                             **{key: r[key] for key in ("mean_abs_diff", "max_abs_diff", "label_agreement")}})
        samples = interleaved_timings(runners, runs, rounds, 20)
    for r in rows:
        r["latency_ratio"] = (statistics.median(samples[f"{r['config']}|{r['variant']}"])
                              / statistics.median(samples[f"{r['config']}|fp32"]))
    return rows
