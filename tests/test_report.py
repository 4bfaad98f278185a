"""Reports built from small fake run folders with numbers chosen so the expected table is known by hand."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import pytest

from ptanet.report import (
    TABLE5_COLUMNS,
    figure2,
    load_run,
    speed_quality_plot,
    speed_quality_rows,
    table5,
    write_report,
)
from ptanet.tables import format_value, render, to_markdown, write_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _val(acc: float, acer: float) -> dict:
    return {"accuracy": acc, "apcer": acer, "bpcer": acer, "acer": acer, "loss": 0.1, "auc": 0.99}


# Baseline: epoch times 600, 660, 720 s -> mean 660 s = 11.0 min, sum 1980 s = 0.55 h.
#   val ACER 0.093, 0.020, 0.010 -> best epoch 3 (ACER 1.00 %, accuracy 98.00 %).
BASELINE_EPOCHS = [
    {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "epoch_time_s": 600.0, "images_per_s": 50.0,
     "lr": 1e-4, "val": {"No PTA": _val(0.90, 0.093)}},
    {"epoch": 2, "train_loss": 0.3, "train_accuracy": 0.9, "epoch_time_s": 660.0, "images_per_s": 50.0,
     "lr": 1e-4, "val": {"No PTA": _val(0.97, 0.020)}},
    {"epoch": 3, "train_loss": 0.2, "train_accuracy": 0.95, "epoch_time_s": 720.0, "images_per_s": 50.0,
     "lr": 1e-4, "val": {"No PTA": _val(0.98, 0.010)}},
]
# PTA: epoch times 540, 540, 600 s -> mean 560 s = 9.333 min, sum 1680 s = 0.4667 h.
#   HHH ACER 0.0646, 0.0053, 0.0080 -> best epoch 2 (ACER 0.53 %, accuracy 99.10 %), although
#   epoch 3 has the higher accuracy (99.50 %) and LLL has a lower ACER at epoch 3: neither may be picked.
PTA_EPOCHS = [
    {"epoch": 1, "train_loss": 0.4, "train_accuracy": 0.85, "epoch_time_s": 540.0, "images_per_s": 60.0,
     "lr": 1e-4, "config_counts": {"HHH": 45, "LLL": 10},
     "val": {"HHH": _val(0.93, 0.0646), "LLL": _val(0.92, 0.07)}},
    {"epoch": 2, "train_loss": 0.25, "train_accuracy": 0.93, "epoch_time_s": 540.0, "images_per_s": 60.0,
     "lr": 1e-4, "config_counts": {"HHH": 44, "LLL": 11},
     "val": {"HHH": _val(0.991, 0.0053), "LLL": _val(0.98, 0.02)}},
    {"epoch": 3, "train_loss": 0.15, "train_accuracy": 0.96, "epoch_time_s": 600.0, "images_per_s": 60.0,
     "lr": 1e-4, "config_counts": {"HHH": 46, "LLL": 9},
     "val": {"HHH": _val(0.995, 0.0080), "LLL": _val(0.99, 0.001)}},
]
COMPLEXITY = [
    {"model": "No PTA", "config": None, "params_m": 2.23, "mops": 104.15},
    {"model": "PTA-HHH", "config": "HHH", "params_m": 2.23, "mops": 104.15},
    {"model": "PTA-LLL", "config": "LLL", "params_m": 1.73, "mops": 87.84},
]
TABLE3 = [
    {"model": "No PTA", "config": None, "bn": "n/a", "threshold_rule": "0.5", "threshold": 0.5, "acer": 0.0263},
    {"model": "PTA-HHH", "config": "HHH", "bn": "shared", "threshold_rule": "0.5", "threshold": 0.5, "acer": 0.0300},
    {"model": "PTA-HHH", "config": "HHH", "bn": "recalibrated", "threshold_rule": "0.5", "threshold": 0.5,
     "acer": 0.0242},
    {"model": "PTA-HHH", "config": "HHH", "bn": "recalibrated", "threshold_rule": "eer@val", "threshold": 0.4,
     "acer": 0.0100},
    {"model": "PTA-LLL", "config": "LLL", "bn": "shared", "threshold_rule": "0.5", "threshold": 0.5, "acer": 0.0226},
]


def _make_run(root: Path, arch: str, epochs: list[dict], extra: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps({"arch": arch, "epochs": 3, "batch_size": 32}))
    (root / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    if extra:
        (root / "complexity.json").write_text(json.dumps(COMPLEXITY))
        (root / "eval").mkdir()
        (root / "eval" / "table3.json").write_text(json.dumps(TABLE3))
    return root


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    return (
        _make_run(tmp_path / "baseline", "mobilenet_v2", BASELINE_EPOCHS),
        _make_run(tmp_path / "pta", "pta_mobilenet_v2", PTA_EPOCHS, extra=True),
    )


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a real plot with axes, lines and text, not an empty canvas


def test_load_run(runs):
    base, pta = (load_run(r) for r in runs)
    assert base.label == "MobileNetV2" and not base.is_pta and base.complexity is None and base.table3 is None
    assert pta.label == "MobileNetV2+PTA" and pta.is_pta
    assert [h["epoch"] for h in pta.history] == [1, 2, 3]
    assert pta.complexity == COMPLEXITY and pta.table3 == TABLE3


def test_table5_numbers_by_hand(runs):
    base, pta = table5([load_run(r) for r in runs])
    assert base["model"] == "MobileNetV2" and base["val_config"] == "No PTA"
    assert base["epoch_time_min"] == pytest.approx(11.0)
    assert base["train_time_h"] == pytest.approx(0.55)
    assert base["epoch_time_median_min"] == pytest.approx(11.0)
    assert (base["best_epoch"], base["best_acer"], base["best_accuracy"]) == (3, 0.010, 0.98)
    assert pta["model"] == "MobileNetV2+PTA" and pta["val_config"] == "HHH"
    assert pta["epoch_time_min"] == pytest.approx(560 / 60)
    assert pta["epoch_time_median_min"] == pytest.approx(9.0)  # median of 540, 540, 600 s
    assert pta["train_time_h"] == pytest.approx(1680 / 3600)
    # Best by HHH ACER (epoch 2), accuracy from that same epoch, not the max accuracy (0.995).
    assert (pta["best_epoch"], pta["best_acer"], pta["best_accuracy"]) == (2, 0.0053, 0.991)


def test_table5_other_selection_config(runs):
    _, pta = table5([load_run(r) for r in runs], config="LLL")
    assert (pta["best_epoch"], pta["best_acer"], pta["val_config"]) == (3, 0.001, "LLL")


def test_table5_unknown_config_is_an_error(runs):
    with pytest.raises(ValueError, match="BBB"):
        table5([load_run(runs[1])], config="BBB")


def test_table5_markdown(runs):
    md = to_markdown(table5([load_run(r) for r in runs]), TABLE5_COLUMNS)
    lines = md.splitlines()
    assert lines[0].startswith("| Configuration | Epoch Training Time (m) |")
    assert lines[2] == "| MobileNetV2 | 11.00 | 0.55 | 11.00 | 98.00 | 1.00 | 3 | 3 | No PTA |"
    assert lines[3] == "| MobileNetV2+PTA | 9.33 | 0.47 | 9.00 | 99.10 | 0.53 | 2 | 3 | HHH |"


def test_figure2_writes_png(runs, tmp_path):
    out = figure2([load_run(r) for r in runs], tmp_path / "out" / "fig2.png")
    assert out == tmp_path / "out" / "fig2.png"
    _assert_png(out)


def test_speed_quality_rows_join_and_preference(runs):
    rows = speed_quality_rows([load_run(r) for r in runs])
    by_model = {r["model"]: r for r in rows}
    assert [r["model"] for r in rows][0] == "PTA-LLL"  # sorted by Mops: 87.84 first
    assert set(by_model) == {"No PTA", "PTA-HHH", "PTA-LLL"}
    assert by_model["PTA-HHH"]["acer"] == 0.0242  # recalibrated preferred, threshold 0.5 (not eer@val)
    assert by_model["No PTA"]["acer"] == 0.0263  # the baseline has no BN choice ("n/a")
    assert by_model["PTA-LLL"]["mops"] == 87.84


def test_speed_quality_plot(tmp_path):
    rows = [{"model": "No PTA", "mops": 104.15, "acer": 0.0263}, {"model": "PTA-LLL", "mops": 87.84, "acer": 0.0226}]
    _assert_png(speed_quality_plot(rows, tmp_path / "sq.png"))
    with pytest.raises(ValueError, match="mops"):
        speed_quality_plot([{"model": "x", "mops": None, "acer": 0.1}], tmp_path / "none.png")


def test_write_report(runs, tmp_path):
    out = tmp_path / "report"
    written = write_report(runs, out)
    assert set(written) == {"table5.md", "table5.json", "table5.csv", "figure2.png", "speed_quality.png"}
    for path in written.values():
        assert path.parent == out and path.is_file()
    _assert_png(written["figure2.png"])
    _assert_png(written["speed_quality.png"])
    rows = json.loads(written["table5.json"].read_text())
    assert [r["best_epoch"] for r in rows] == [3, 2]


def test_write_report_without_eval_has_no_speed_plot(tmp_path):
    base = _make_run(tmp_path / "b", "mobilenet_v2", BASELINE_EPOCHS)
    written = write_report([base], tmp_path / "r")
    assert "speed_quality.png" not in written
    assert not (tmp_path / "r" / "speed_quality.png").exists()


def test_truncated_last_history_line_is_ignored_with_warning(runs):
    history = runs[1] / "history.jsonl"
    text = history.read_text()
    history.write_text(text + json.dumps(PTA_EPOCHS[0])[:40])  # killed while writing epoch 4
    with pytest.warns(UserWarning, match="truncated"):
        run = load_run(runs[1])
    assert len(run.history) == 3


def test_broken_middle_history_line_is_an_error(runs):
    history = runs[0] / "history.jsonl"
    lines = history.read_text().splitlines()
    lines[1] = lines[1][:20]
    history.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"history\.jsonl:2"):
        load_run(runs[0])


@pytest.mark.parametrize("name", ["settings.json", "history.jsonl"])
def test_missing_file_error_names_the_file(runs, name):
    (runs[0] / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        load_run(runs[0])


def test_broken_optional_file_error_names_the_file(runs):
    (runs[1] / "eval" / "table3.json").write_text("[{")
    with pytest.raises(ValueError, match="table3.json"):
        load_run(runs[1])


def test_bad_arch_is_an_error(runs):
    (runs[0] / "settings.json").write_text(json.dumps({"arch": "resnet"}))
    with pytest.raises(ValueError, match="settings.json"):
        load_run(runs[0])


# --- tables -----------------------------------------------------------------------------------

COLUMNS = [("name", "Name", "str"), ("acer", "ACER (%)", "pct"), ("mops", "Mops", "f2"),
           ("auc", "AUC", "f3"), ("n", "N", "int")]
ROWS = [
    {"name": "PTA-HHH", "acer": 0.02424, "mops": 104.154, "auc": 0.99871, "n": 513, "extra": [1, 2]},
    {"name": "a|b", "acer": float("nan"), "mops": None, "auc": 0.5, "n": 7.0},
]


def test_format_value():
    assert format_value(0.02424, "pct") == "2.42"
    assert format_value(1.0, "pct") == "100.00"
    assert format_value(104.154, "f2") == "104.15"
    assert format_value(0.99871, "f3") == "0.999"
    assert format_value(7.0, "int") == "7"
    assert format_value(float("nan"), "pct") == "n/a"
    assert format_value(None, "str") == "n/a"
    with pytest.raises(ValueError, match="pcnt"):
        format_value(0.1, "pcnt")


def test_markdown_nan_and_escaping():
    lines = to_markdown(ROWS, COLUMNS).splitlines()
    assert lines[0] == "| Name | ACER (%) | Mops | AUC | N |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| PTA-HHH | 2.42 | 104.15 | 0.999 | 513 |"
    assert lines[3] == r"| a\|b | n/a | n/a | 0.500 | 7 |"
    assert to_markdown([{}], COLUMNS).splitlines()[2] == "| n/a | n/a | n/a | n/a | n/a |"


def test_write_table_round_trip(tmp_path):
    paths = write_table(ROWS, COLUMNS, tmp_path / "sub" / "t")
    assert paths == {ext: tmp_path / "sub" / f"t.{ext}" for ext in ("md", "json", "csv")}
    assert paths["md"].read_text() == to_markdown(ROWS, COLUMNS)
    back = json.loads(paths["json"].read_text())
    assert back[0] == ROWS[0]  # raw values, all keys kept
    assert back[1]["acer"] is None and back[1]["mops"] is None  # nan -> null
    with paths["csv"].open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["name", "acer", "mops", "auc", "n"]
    assert table[1] == ["PTA-HHH", "0.02424", "104.154", "0.99871", "513"]
    assert table[2] == ["a|b", "", "", "0.5", "7.0"]
    assert math.isclose(float(table[1][1]), ROWS[0]["acer"])


def test_write_table_rejects_bad_format_before_writing(tmp_path):
    with pytest.raises(ValueError):
        write_table(ROWS, [("acer", "ACER", "percent")], tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_no_pyplot_figures_left_open(runs, tmp_path):
    # Reports must not leak pyplot state (memory growth across many runs, display attempts).
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(runs, tmp_path / "r2")
    assert plt.get_fignums() == []


def test_render_prints_what_write_table_writes(tmp_path):
    rows = [{"model": "PTA-LLL", "acer": float("nan"), "n": 3}]
    columns = [("model", "Configuration", "str"), ("acer", "ACER (%)", "pct"), ("n", "N", "int")]
    paths = write_table(rows, columns, tmp_path / "t")
    assert render(rows, columns, "json") == paths["json"].read_text()
    assert render(rows, columns, "csv") == paths["csv"].read_text() == "model,acer,n\nPTA-LLL,,3\n"
    assert render(rows, columns, "markdown") == paths["md"].read_text()
    assert '"acer": null' in render(rows, columns, "json")  # never the invalid JSON token NaN
    with pytest.raises(ValueError, match="unknown table format 'xml'"):
        render(rows, columns, "xml")
