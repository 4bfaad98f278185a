"""Attack-type transfer: synthetic live faces and screen replays mixed into the train part."""

import numpy as np
import pytest

from ptanet.data.dataset import MIX_PREFIX, MIX_SPOOF_TYPES
from ptanet.data.synth import write_synth
from ptanet.train.settings import load_data, resolve_settings


@pytest.fixture(scope="module")
def other_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix") / "synth"
    write_synth(root, n_subjects_train=4, n_subjects_test=1, images_per_subject=8, size=96, seed=5, workers=1)
    return root


def _settings(real, synth, tmp_path, **kw):
    return resolve_settings(data=str(real), out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), size=32,
                            prepare_workers=0, synth_data=str(synth), val_split="random", **kw)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_the_mix_has_the_requested_share_and_only_live_and_replay_images(tiny_synth, other_synth, tmp_path, fraction):
    plain = load_data(_settings(tiny_synth, other_synth, tmp_path), progress=False)
    mixed = load_data(_settings(tiny_synth, other_synth, tmp_path, mix_synth=fraction), progress=False)
    synthetic = [k for k, rel in enumerate(mixed["train"].rels) if rel.startswith(MIX_PREFIX)]
    n_real = len(plain["train"])
    assert len(mixed["train"]) - len(synthetic) == n_real  # every real training image stays
    assert len(synthetic) == round(fraction / (1 - fraction) * n_real)
    assert sorted(r for r in mixed["train"].rels if not r.startswith(MIX_PREFIX)) == sorted(plain["train"].rels)
    types = mixed["train"].spoof_types[synthetic]
    labels = mixed["train"].labels[synthetic]
    assert set(types.tolist()) <= {0, *MIX_SPOOF_TYPES} and 0 in types and (types != 0).any()
    assert np.array_equal(labels, (types != 0).astype(int))  # a label per attack type, live/spoof for training
    assert all(mixed["train"].subjects[k].startswith(MIX_PREFIX) for k in synthetic)
    assert mixed["val"].rels == plain["val"].rels  # validation stays real
    assert f"{len(synthetic)} images of" in mixed["split"]
    again = load_data(_settings(tiny_synth, other_synth, tmp_path, mix_synth=fraction), progress=False)
    assert again["train"].rels == mixed["train"].rels  # seeded


def test_too_large_a_share_and_a_missing_set_are_clear_errors(tiny_synth, other_synth, tmp_path):
    with pytest.raises(ValueError, match="needs .* synthetic images"):
        load_data(_settings(tiny_synth, other_synth, tmp_path, mix_synth=0.95), progress=False)
    with pytest.raises(ValueError, match="mix_synth needs synth_data"):
        resolve_settings(data=str(tiny_synth), mix_synth=0.3)
    with pytest.raises(ValueError, match="mix_synth must be in"):
        resolve_settings(data=str(tiny_synth), mix_synth=1.0, synth_data=str(other_synth))


def test_cross_validation_folds_hold_real_people_only(tiny_synth, other_synth, tmp_path):
    import json

    from ptanet import cv

    settings = _settings(tiny_synth, other_synth, tmp_path, mix_synth=0.3)
    result = cv.cross_validate(settings, tmp_path / "cv", k=3, only=[], progress=False, log=lambda *_: None)
    folds = json.loads((tmp_path / "cv" / "folds.json").read_text())["0"]
    real = set(load_data(_settings(tiny_synth, other_synth, tmp_path), progress=False)["train"].subjects) | set(
        load_data(_settings(tiny_synth, other_synth, tmp_path), progress=False)["val"].subjects)
    assert sorted(p for f in folds for p in f) == sorted(real) and len(result["pending"]) == 3
    fold = load_data(cv.fold_settings(settings, tmp_path / "cv", 0, 0, folds[0]), progress=False)
    assert any(s.startswith(MIX_PREFIX) for s in fold["train"].subjects)  # every fold trains with the mix
    assert not any(s.startswith(MIX_PREFIX) for s in fold["holdout"].subjects)
