"""Table 3 from checkpoints: rows per configuration, BN mode and threshold rule; the CLI around it."""

import json

import pytest

from ptanet.cli import main
from ptanet.train.loop import train
from ptanet.train.settings import resolve_settings
from ptanet.evaluate import evaluate_checkpoints, select, table3_markdown, write_table3


@pytest.fixture(scope="module")
def tiny_runs(tiny_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    ckpts = {}
    for arch in ("pta_mobilenet_v2", "mobilenet_v2"):
        s = resolve_settings(data=str(tiny_synth), out=str(out / arch), cache=str(out / "cache"), arch=arch, size=32,
                             batch_size=4, epochs=1, val_configs=["HHH"], bn_configs=["LLL", "BBB"], bn_images=8,
                             prepare_workers=0)
        ckpts[arch] = train(s, progress=False, log=lambda *_: None).best_checkpoint
    return ckpts


def test_rows_per_config_bn_mode_and_threshold(tiny_runs, tmp_path):
    rows = evaluate_checkpoints([tiny_runs["pta_mobilenet_v2"], tiny_runs["mobilenet_v2"]], ["HHH", "LLL", "BBB"],
                                progress=False, log=lambda *_: None)
    pta = [r for r in rows if r["config"]]
    assert len(pta) == 3 * 2 * 2  # configs x {recalibrated, shared} x {0.5, eer@val}
    assert {(r["bn"], r["threshold_rule"]) for r in pta} == {(b, t) for b in ("recalibrated", "shared") for t in ("0.5", "eer@val")}
    base = [r for r in rows if r["config"] is None]
    assert [r["model"] for r in base] == ["No PTA", "No PTA"]
    for r in rows:
        assert 0 <= r["acer"] <= 1 and r["n"] == 8
        assert r["apcer_paper_formula"] == r["bpcer"] and r["bpcer_paper_formula"] == r["apcer"]
    # HHH has no stored statistics of its own here, so both BN modes give the same numbers for it;
    # LLL has its own, and they change the scores.
    hhh = {r["bn"]: r["auc"] for r in select(rows, "0.5", "recalibrated") + select(rows, "0.5", "shared") if r["config"] == "HHH"}
    assert hhh["recalibrated"] == hhh["shared"]
    picked = select(rows)
    assert {r["bn"] for r in picked if r["config"]} == {"recalibrated"} and len(picked) == 4
    md = table3_markdown(rows)
    assert "per-configuration BatchNorm statistics" in md and "shared BatchNorm statistics (paper)" in md
    assert "| PTA-LLL |" in md and "| No PTA |" in md
    # Rows of two model files name the file; rows of one do not need to.
    assert "| Configuration | Model file |" in md and f"| PTA-LLL | {pta[0]['checkpoint']} |" in md
    assert "Model file" not in table3_markdown(pta)
    paths = write_table3(rows, tmp_path)
    assert len(json.loads(paths["json"].read_text())) == len(rows)
    assert paths["csv"].read_text().count("\n") == len(rows) + 1
    # Per test subject: the counts add up to each row's error rates.
    for r in rows:
        groups = r["per_subject"]
        assert groups and sum(g["n_live"] + g["n_spoof"] for g in groups) == r["n"]
        assert sum(g["live_rejected"] for g in groups) == round(r["bpcer"] * r["n_live"])
        assert sum(g["attacks_accepted"] for g in groups) == round(r["apcer"] * r["n_spoof"])
    n_groups = sum(len(r["per_subject"]) for r in rows)
    assert len(json.loads(paths["per_subject_json"].read_text())) == n_groups
    assert paths["per_subject_md"].read_text().count("| PTA-LLL | recalibrated | 0.5 |") == len(rows[0]["per_subject"])


def test_no_bn_recalibration_gives_paper_rows_only(tiny_runs):
    rows = evaluate_checkpoints([tiny_runs["pta_mobilenet_v2"]], ["LLL"], bn_recalibration=False, progress=False, log=lambda *_: None)
    assert {r["bn"] for r in rows} == {"shared"} and len(rows) == 2


def test_cli_evaluate_and_errors(tiny_runs, tmp_path, capsys):
    assert main(["evaluate", str(tiny_runs["pta_mobilenet_v2"]), "--configs", "HHH,LLL", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| PTA-LLL |" in out and (tmp_path / "table3.csv").exists()
    assert main(["evaluate", str(tiny_runs["pta_mobilenet_v2"]), "--configs", "HXH"]) == 2
    assert "invalid PTA configuration 'HXH'" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err


def test_validation_split_measures_the_validation_part(tiny_runs, tmp_path, capsys):
    from ptanet.checkpoint import load_checkpoint
    from ptanet.data import CropDataset
    from ptanet.scoring import predict
    from ptanet.preprocess import Preprocess
    from ptanet.train.settings import load_data
    from ptanet.metrics import compute_metrics

    rows = evaluate_checkpoints([tiny_runs["mobilenet_v2"]], split="val", progress=False, log=lambda *_: None)
    ck = load_checkpoint(tiny_runs["mobilenet_v2"])
    val = load_data(resolve_settings(**ck.meta["settings"]), progress=False)["val"]
    scores, _ = predict(ck.model, CropDataset(val, Preprocess.from_dict(ck.preprocess)))
    expected = compute_metrics(scores, val.labels, 0.5)
    row = select(rows)[0]
    assert row["split"] == "val" and row["n"] == len(val) and row["acer"] == expected["acer"]
    assert table3_markdown(rows).startswith("### Validation, threshold 0.5")
    with pytest.raises(ValueError, match="unknown split 'train'"):
        evaluate_checkpoints([tiny_runs["mobilenet_v2"]], split="train", progress=False, log=lambda *_: None)
    assert main(["evaluate", str(tiny_runs["mobilenet_v2"]), "--split", "val", "--out", str(tmp_path)]) == 0
    assert "### Validation" in capsys.readouterr().out


def test_cli_complexity_json(capsys):
    assert main(["complexity", "--configs", "LLL", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["No PTA", "PTA-LLL"]
    assert rows[1]["mops"] == pytest.approx(87.84, abs=0.1)


def test_evaluate_on_a_test_only_root_takes_the_threshold_from_the_checkpoints_own_data(tiny_runs, tiny_synth, tmp_path,
                                                                                     capsys):
    import shutil

    from ptanet.checkpoint import load_checkpoint, save_checkpoint

    # Another data set holding only a test split: the cross-dataset case.
    other = tmp_path / "other"
    shutil.copytree(tiny_synth / "Data" / "test", other / "Data" / "test")
    (other / "metas" / "intra_test").mkdir(parents=True)
    shutil.copy(tiny_synth / "metas" / "intra_test" / "test_label.json", other / "metas" / "intra_test")
    quiet = dict(progress=False, log=lambda *_: None)
    own = evaluate_checkpoints([tiny_runs["mobilenet_v2"]], **quiet)
    rows = evaluate_checkpoints([tiny_runs["mobilenet_v2"]], data=str(other), cache=str(tmp_path / "c"), **quiet)
    # Same images, same validation part for the threshold: the same numbers as on the own test split.
    assert [(r["threshold_rule"], r["threshold"], r["acer"]) for r in rows] == [
        (r["threshold_rule"], r["threshold"], r["acer"]) for r in own]
    settings = load_checkpoint(tiny_runs["mobilenet_v2"]).meta["settings"]
    assert rows[1]["threshold_from"] == f"validation part of {settings['data']}" and rows[0]["threshold_from"] == "fixed"
    assert rows[0]["data"] == str(other.resolve())
    assert f"Thresholds chosen on the validation part of {settings['data']}" in table3_markdown(rows)
    assert main(["evaluate", str(tiny_runs["mobilenet_v2"]), "--data", str(other), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "table3.md").exists()

    # A checkpoint whose training data is not here: only the rows at 0.5, and the log says why.
    ck = load_checkpoint(tiny_runs["mobilenet_v2"])
    moved = tmp_path / "moved.pt"
    save_checkpoint(moved, ck.model, ck.preprocess, meta={**ck.meta, "settings": {**settings, "data": str(tmp_path / "gone")}})
    said = []
    rows = evaluate_checkpoints([moved], data=str(other), cache=str(tmp_path / "c"), progress=False, log=said.append)
    assert [r["threshold_rule"] for r in rows] == ["0.5"] and rows[0]["acer"] == own[0]["acer"]
    assert any("no validation part to choose an EER threshold" in s for s in said)
    with pytest.raises(FileNotFoundError, match="gone: the data .* was trained on is not here; pass --data"):
        evaluate_checkpoints([moved], **quiet)
    with pytest.raises(ValueError, match="--split val measures the validation part"):
        evaluate_checkpoints([tiny_runs["mobilenet_v2"]], data=str(other), split="val", **quiet)


def test_an_exported_model_gets_the_checkpoints_rows(tiny_runs, tmp_path, capsys):
    """ptanet evaluate on what a deployment runs: the switchable folder's rows equal the checkpoint's
    (its per-configuration BatchNorm statistics are in the graphs), and a static file works too."""
    from ptanet.export import export_onnx, export_switchable_folder

    ck = tiny_runs["pta_mobilenet_v2"]
    folder = export_switchable_folder(ck, tmp_path / "model_switchable", ["HHH", "LLL"])["path"]
    quiet = dict(progress=False, log=lambda *_: None)
    want = {(r["config"], r["threshold_rule"]): r for r in evaluate_checkpoints([ck], ["HHH", "LLL"], **quiet)
            if r["bn"] == "recalibrated"}
    rows = evaluate_checkpoints([folder], **quiet)
    assert [(r["config"], r["bn"], r["threshold_rule"]) for r in rows] == [
        (c, "exported", t) for c in ("HHH", "LLL") for t in ("0.5", "eer@val")]
    for r in rows:
        w = want[(r["config"], r["threshold_rule"])]
        assert r["n"] == w["n"] and r["auc"] == pytest.approx(w["auc"], abs=1e-6)
        # The EER point lies between two scores: float32 kernels may move it within that gap, not the ACER.
        assert r["acer"] == pytest.approx(w["acer"]) and r["threshold"] == pytest.approx(w["threshold"], abs=1e-3)
    from ptanet.bench import evaluate_exported  # what ptanet export --int8 reports with: the same numbers

    quick = {r["config"]: r["acer"] for r in evaluate_exported(folder, ck)}
    assert quick == {r["config"]: r["acer"] for r in rows if r["threshold_rule"] == "0.5"}
    static = export_onnx(ck, tmp_path / "model_LLL.onnx", config="LLL")["path"]
    assert main(["evaluate", static, "--out", str(tmp_path / "e")]) == 0
    assert "exported model (onnxruntime)" in (tmp_path / "e" / "table3.md").read_text()
    with pytest.raises(ValueError, match=r"model_switchable: no configuration BBB in this model; it holds HHH, LLL"):
        evaluate_checkpoints([folder], ["BBB"], **quiet)
