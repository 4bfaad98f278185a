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

import torch
from torch import nn

from ptanet.configs import PAPER_CONFIGS, config_label, parse_config
from ptanet.models import create_model

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
