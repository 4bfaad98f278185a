"""Cross-validation by subject: folds, out-of-fold scores, summary, resume."""

import json

import numpy as np
import pytest

from ptanet import cv
from ptanet.checkpoint import load_checkpoint
from ptanet.data import CropDataset
from ptanet.preprocess import Preprocess
from ptanet.scoring import score_configs
from ptanet.train.settings import load_data, resolve_settings


def test_subject_folds_cover_every_subject_once_balanced_and_seeded():
    rng = np.random.default_rng(1)
    subjects = [f"s{rng.integers(0, 11)}" for _ in range(400)]
    labels = rng.integers(0, 2, 400).tolist()
    folds = cv.subject_folds(subjects, labels, k=4, seed=0)
    people = [p for fold in folds for p in fold]
    assert sorted(people) == sorted(set(subjects)) and all(folds)  # each person once, no empty fold
    assert cv.subject_folds(subjects, labels, k=4, seed=0) == folds
    # Balanced: no fold holds more than twice its share of either class.
    for label in (0, 1):
        per_fold = [sum(1 for s, y in zip(subjects, labels) if s in fold and y == label) for fold in folds]
        assert max(per_fold) <= 2 * sum(per_fold) / 4
    with pytest.raises(ValueError, match="cannot make 12 subject folds from 11 subjects"):
        cv.subject_folds(subjects, labels, k=12)


def test_cross_validation_scores_each_person_with_the_model_that_did_not_see_them(tiny_synth, tmp_path, monkeypatch):
    settings = resolve_settings(data=str(tiny_synth), out=str(tmp_path / "cv"), size=32, batch_size=4, epochs=1,
                                val_configs=["HHH"], bn_configs=["LLL"], bn_images=8, prepare_workers=0,
                                val_split="random")
    quiet = dict(progress=False, log=lambda *_: None)
    # Folds shared by two calls (as two processes would): the first leaves the summary to the last.
    first = cv.cross_validate(settings, tmp_path / "cv", k=3, configs=["HHH", "LLL"], only=[0], **quiet)
    assert first["rows"] is None and first["pending"] == ["seed 0 fold 1", "seed 0 fold 2"]
    assert not (tmp_path / "cv" / "cv.md").exists()
    result = cv.cross_validate(settings, tmp_path / "cv", k=3, configs=["HHH", "LLL"], only=[1, 2],
                               transfer=tiny_synth, **quiet)
    assert result["pending"] == []
    records = result["records"]
    # The transfer set's test split, scored by every fold model (fold 0's after the fact), per attack group.
    assert all(r["transfer"]["root"] == str(tiny_synth) for r in records)
    transfer = {(t["model"], t["group"]): t for t in result["transfer_rows"]}
    lll_threshold = {row["model"]: row for row in result["rows"]}["PTA-LLL"]["oof_threshold"]
    for (model, group), t in transfer.items():
        per_fold = []
        for r in records:
            labels, types = np.array(r["transfer"]["labels"]), np.array(r["transfer"]["spoof_types"])
            keep = (labels == 0) | np.array([cv.attack_group(int(k)) == group for k in types]) & (labels == 1)
            per_fold.append(cv.compute_metrics(np.array(r["transfer"]["scores"][model])[keep], labels[keep],
                                               lll_threshold if model == "PTA-LLL" else 0.5))
        assert t["auc_mean"] == pytest.approx(np.mean([m["auc"] for m in per_fold]))
        if model == "PTA-LLL":
            assert t["apcer_mean"] == pytest.approx(np.mean([m["apcer"] for m in per_fold]))
    assert (tmp_path / "cv" / "transfer.md").exists()
    whole = load_data(settings, progress=False)
    held = [s for r in records for s in r["holdout_subjects"]]
    assert len(records) == 3 and sorted(held) == sorted(set(whole["train"].subjects + whole["val"].subjects))
    everyone = sorted(rel for r in records for rel in r["rels"])
    assert everyone == sorted(whole["train"].rels + whole["val"].rels)  # every training image scored once
    for r in records:
        run = tmp_path / "cv" / "seed0" / f"fold{r['fold']}"
        stored = json.loads((run / "settings.json").read_text())
        assert stored["holdout_subjects"] == r["holdout_subjects"]
        fold = load_data(resolve_settings(**stored), progress=False)
        assert not set(fold["train"].subjects + fold["val"].subjects) & set(r["holdout_subjects"])
        ck = load_checkpoint(run / "best.pt")
        scores = score_configs(ck.model, CropDataset(fold["holdout"], Preprocess.from_dict(ck.preprocess)), ["LLL"])
        assert np.array_equal(np.float32(r["scores"]["PTA-LLL"]), scores["LLL"][0])
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"PTA-HHH", "PTA-LLL"} and rows["PTA-LLL"]["n_folds"] == 3
    pooled = np.concatenate([r["scores"]["PTA-LLL"] for r in records])
    labels = np.concatenate([r["labels"] for r in records])
    from ptanet.metrics import compute_metrics

    assert rows["PTA-LLL"]["oof_auc"] == compute_metrics(pooled, labels, 0.5)["auc"]
    assert (tmp_path / "cv" / "cv.md").exists() and (tmp_path / "cv" / "cv.csv").exists()

    # Finished folds are not trained again.
    monkeypatch.setattr(cv, "train", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    again = cv.cross_validate(settings, tmp_path / "cv", k=3, configs=["HHH", "LLL"], **quiet)
    assert again["rows"] == result["rows"]


def _fake_cv(folder, models=("PTA-HHH", "PTA-LLL"), seed=3):
    """An oof_scores.json as ptanet cv writes it: two folds, scores where each configuration's EER point differs."""
    rng = np.random.default_rng(seed)
    records = []
    for fold in range(2):
        labels = [0] * 20 + [1] * 20
        scores = {m: (np.r_[rng.uniform(0, 0.3 + 0.2 * k, 20), rng.uniform(0.2 + 0.2 * k, 1, 20)]).tolist()
                  for k, m in enumerate(models)}
        records.append({"seed": 0, "fold": fold, "labels": labels, "scores": scores, "subjects": ["a"] * 40})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "oof_scores.json").write_text(json.dumps(records))
    return records


def test_cv_threshold_is_the_pooled_out_of_fold_threshold_per_configuration(tmp_path):
    from ptanet.calibrate import pick_threshold

    records = _fake_cv(tmp_path / "cv")
    labels = np.concatenate([r["labels"] for r in records])
    for target in ("eer", "bpcer=0.05"):
        record = cv.cv_threshold(tmp_path / "cv", target)
        for model in ("PTA-HHH", "PTA-LLL"):
            pooled = np.concatenate([r["scores"][model] for r in records])
            assert record["per_config"][model[4:]] == pick_threshold(pooled, labels, target)
        assert record["value"] == record["per_config"]["HHH"] and record["n"] == 80 and record["rule"] == target
    assert cv.cv_threshold(tmp_path / "cv")["per_config"]["HHH"] != cv.cv_threshold(tmp_path / "cv")["per_config"]["LLL"]
    with pytest.raises(FileNotFoundError, match="no out-of-fold scores"):
        cv.cv_threshold(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "oof_scores.json").write_text("[{}]")
    with pytest.raises(ValueError, match="not the out-of-fold scores"):
        cv.cv_threshold(tmp_path / "bad")


def test_stored_cv_threshold_round_trips_through_checkpoint_evaluate_export_and_runtime(tiny_model, tmp_path):
    import shutil

    from ptanet.evaluate import evaluate_checkpoints
    from ptanet.export import export_switchable
    from ptanet.infer import Predictor
    from ptanet.runtime import DeployedModel

    _fake_cv(tmp_path / "cv")
    model = tmp_path / "best.pt"
    shutil.copy(tiny_model, model)
    record = cv.store_cv_threshold(model, tmp_path / "cv", log=lambda *_: None)
    hhh, lll = record["per_config"]["HHH"], record["per_config"]["LLL"]
    assert load_checkpoint(model).meta["threshold"] == record
    predictor = Predictor(model)
    assert (predictor.config, predictor.threshold, predictor.threshold_source) == ("HHH", hhh, "stored")
    assert predictor.set_config("LLL").threshold == lll
    assert predictor.set_config("BBB").threshold == hhh  # not cross-validated: the selection configuration's
    assert Predictor(model, threshold=0.4).set_config("LLL").threshold == 0.4

    rows = evaluate_checkpoints([model], ["HHH", "LLL"], progress=False, log=lambda *_: None)
    stored = {r["config"]: r for r in rows if r["threshold_rule"] == "stored" and r["bn"] == "recalibrated"}
    assert stored["HHH"]["threshold"] == hhh and stored["LLL"]["threshold"] == lll
    assert "out-of-fold scores" in stored["LLL"]["threshold_from"]

    onnx_path = export_switchable(model, tmp_path / "deploy" / "model.onnx", configs=["HHH", "LLL", "BBB"])["path"]
    deployed = DeployedModel(onnx_path)
    assert deployed.set_config("HHH").threshold == hhh and deployed.set_config("LLL").threshold == lll
    assert deployed.set_config("BBB").threshold == hhh
    assert Predictor(onnx_path, config="LLL").threshold == lll


def test_cv_threshold_of_another_architecture_is_refused(tiny_model, tmp_path):
    import shutil

    _fake_cv(tmp_path / "cv", models=("No PTA",))
    shutil.copy(tiny_model, tmp_path / "best.pt")
    with pytest.raises(ValueError, match="same architecture"):
        cv.store_cv_threshold(tmp_path / "best.pt", tmp_path / "cv", log=lambda *_: None)
    assert "threshold" not in load_checkpoint(tmp_path / "best.pt").meta


def test_cv_only_nothing_prepares_the_caches_and_trains_no_fold(tiny_synth, tmp_path, capsys, monkeypatch):
    from ptanet.cli import main

    monkeypatch.setattr(cv, "train", lambda *a, **k: pytest.fail("--only '' trained a fold"))
    args = ["cv", "--data", str(tiny_synth), "--out", str(tmp_path / "cv"), "--folds", "3", "--size", "32",
            "--prepare-workers", "0", "--transfer-data", str(tiny_synth)]
    assert main(args + ["--only", ""]) == 0
    assert "3 fold(s) still to train" in capsys.readouterr().err
    assert (tmp_path / "cache" / "data" / "train").is_dir()
    assert (tmp_path / "cache" / "data" / f"transfer+{tiny_synth.name}" / "test").is_dir()
    assert main(args + ["--only", "5"]) == 2  # no such fold: a clear error
    assert "folds are numbered 0-2" in capsys.readouterr().err
