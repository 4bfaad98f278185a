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
    result = cv.cross_validate(settings, tmp_path / "cv", k=3, configs=["HHH", "LLL"], **quiet)
    records = result["records"]
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
