"""Complexity against paper Table 4 (ptflops multiply-adds, parameters in use)."""

import pytest

from ptanet.bench import complexity_table, latency_table
from ptanet.configs import all_configs

# Paper Table 4: (params M, Mops) at 128x128.
TABLE4 = {
    "No PTA": (2.23, 104.15),
    "PTA-HHH": (2.23, 104.15),
    "PTA-LHH": (2.17, 100.63),
    "PTA-HLH": (2.11, 96.50),
    "PTA-HHL": (1.91, 99.00),
    "PTA-LLL": (1.73, 87.84),
    "PTA-BBB": (2.73, 120.47),
}


@pytest.fixture(scope="module")
def rows():
    return {r["model"]: r for r in complexity_table()}


def test_complexity_matches_paper_table4(rows):
    assert list(rows) == list(TABLE4)
    for model, (params_m, mops) in TABLE4.items():
        assert rows[model]["mops"] == pytest.approx(mops, abs=0.1), model
        if model == "PTA-BBB":
            # 2.719 M: the paper's 2.73 is a rounding difference (see README).
            assert rows[model]["params_m"] == pytest.approx(2.719, abs=0.001)
        else:
            assert rows[model]["params_m"] == pytest.approx(params_m, abs=0.01), model


def test_complexity_orders_all_27():
    rows = complexity_table(all_configs(), include_baseline=False)
    assert len(rows) == 27
    by = {r["config"]: r for r in rows}
    # Light is cheaper than heavy, both dearer than either, for every block position.
    for cfg in by:
        for i, mode in enumerate(cfg):
            if mode == "H":
                lighter = cfg[:i] + "L" + cfg[i + 1 :]
                both = cfg[:i] + "B" + cfg[i + 1 :]
                assert by[lighter]["mops"] < by[cfg]["mops"] < by[both]["mops"]


def test_latency_table_reports_ratio_to_baseline():
    rows = latency_table(["HHH", "LLL"], size=64, runs=3, rounds=1)
    assert [r["model"] for r in rows] == ["No PTA", "PTA-HHH", "PTA-LLL"]
    assert rows[0]["relative_latency"] == 1.0
    assert all(r["latency_ms"] > 0 for r in rows)


# --- ptanet bench: the deployed-model benchmark -------------------------------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ptanet import bench  # noqa: E402
from ptanet.models import pta_mobilenet_v2  # noqa: E402


def test_interleaved_timings_visit_every_runner_each_round():
    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("a", "b")}
    samples = bench.interleaved_timings(runners, runs=6, rounds=3, warmup=1)
    assert {k: len(v) for k, v in samples.items()} == {"a": 6, "b": 6}
    assert calls[2:] == ["a", "a", "b", "b"] * 3  # after one warm-up call each: rounds alternate


def test_benchmark_rows_per_runtime_with_ratio_to_no_pta(tmp_path):
    result = bench.benchmark(None, ["LLL", "BBB"], ["torch", "onnxruntime"], runs=4, rounds=2, warmup=1,
                             batch_runs=1, size=32, work_dir=tmp_path, progress=False)
    rows = result["rows"]
    assert [(r["model"], r["runtime"]) for r in rows] == [
        (m, rt) for rt in ("torch", "onnxruntime") for m in ("No PTA", "PTA-LLL", "PTA-BBB", bench.BBB_VARIANT)]
    for r in rows:
        assert r["runs"] == 4 and r["p90_ms"] >= r["median_ms"] >= r["p10_ms"] > 0 and r["throughput"] > 0
        assert r["relative"] == (1.0 if r["model"] == "No PTA" else r["median_ms"] / next(
            b["median_ms"] for b in rows if b["model"] == "No PTA" and b["runtime"] == r["runtime"]))
    assert {r["mops"] for r in rows if r["config"] == "BBB"} == {next(r["mops"] for r in rows if r["model"] == "PTA-BBB")}
    assert result["environment"]["threads"] == 1 and result["environment"]["onnxruntime"]
    names = [r["ratio"] for r in bench.speed_ratios(rows)]
    assert "eager / ONNX Runtime, No PTA batch 1 (median)" in names and "BBB (average as Mul) / No PTA, onnxruntime (p10)" in names
    bench.plot_latency_vs_macs(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_the_average_folded_into_the_next_convolution_keeps_the_outputs_and_drops_the_multiply():
    import onnx

    from ptanet.blocks import BothBranches
    from ptanet.export import Deployable, _to_onnx_bytes
    from ptanet.preprocess import Preprocess

    torch.manual_seed(0)
    model = pta_mobilenet_v2().eval()
    for m in model.modules():  # non-trivial BatchNorm so a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.weight.data.uniform_(0.5, 1.5)
    folded, plain = model.to_static("BBB"), model.to_static("BBB", fold_average=False)
    assert [m.scale for m in folded.features if isinstance(m, BothBranches)] == [1.0] * 3
    assert [m.scale for m in plain.features if isinstance(m, BothBranches)] == [0.5] * 3
    assert folded.arch["average_folded"] and "average_folded" not in plain.arch
    assert "average_folded" not in model.to_static("HLH").arch  # nothing to fold
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.set_config("BBB")(x)
        for m in (folded, plain):  # halving is exact: the same bits
            torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    model.set_config("HHH")
    muls = {}
    for name, m in (("folded", folded), ("unfolded", plain)):
        graph = onnx.load_from_string(_to_onnx_bytes(Deployable(m, Preprocess(size=64)), 64, 17, False)).graph
        muls[name] = sum(n.op_type == "Mul" for n in graph.node)
    assert muls == {"folded": 1, "unfolded": 4}  # the normalisation's Mul, plus one per B block


def test_selection_rows_from_bench_and_quality_files(tmp_path):
    rows = [{"model": "PTA-HHH", "config": "HHH", "runtime": "onnxruntime", "median_ms": 3.0},
            {"model": "PTA-LLL", "config": "LLL", "runtime": "onnxruntime", "median_ms": 2.0},
            {"model": "PTA-LLL", "config": "LLL", "runtime": "torch", "median_ms": 9.0}]
    (tmp_path / "b.json").write_text(json.dumps(rows))
    quality = [{"config": "HHH", "bn": "recalibrated", "threshold_rule": "0.5", "acer": 0.04},
               {"config": "HHH", "bn": "shared", "threshold_rule": "0.5", "acer": 0.2},
               {"config": "LLL", "bn": "shared", "threshold_rule": "0.5", "acer": 0.1},
               {"config": "LLL", "bn": "shared", "threshold_rule": "eer@val", "acer": 0.3}]
    (tmp_path / "q.json").write_text(json.dumps(quality))
    got = bench.selection_rows("unused.pt", ["HHH", "LLL"], tmp_path / "b.json", quality_json=tmp_path / "q.json")
    assert [(r["config"], r["latency_ms"], r["acer"]) for r in got] == [("HHH", 3.0, 0.04), ("LLL", 2.0, 0.1)]
    assert got[0]["mops"] > got[1]["mops"]
    with pytest.raises(ValueError, match="no int8 latency for HHH, LLL"):
        bench.selection_rows("unused.pt", ["HHH", "LLL"], tmp_path / "b.json", runtime="int8", quality_json=tmp_path / "q.json")


def test_cpu_burner_stops_its_processes():
    burner = bench.CPUBurner(processes=1, max_seconds=30)
    burner.start()
    procs = list(burner.procs)
    assert all(p.poll() is None for p in procs)
    burner.stop()
    assert all(p.poll() is not None for p in procs) and burner.procs == []
