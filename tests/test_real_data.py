"""Slow: the paper's recipe for a few epochs on the real nuaa-dev set learns real cues."""

import pytest

from ptanet.train.loop import train
from ptanet.train.settings import resolve_settings
from ptanet.evaluate import evaluate_checkpoints, select


@pytest.mark.slow
def test_few_epochs_on_nuaa_dev_learn_real_cues(nuaa_dev, tmp_path):
    settings = resolve_settings(data=str(nuaa_dev), out=str(tmp_path / "run"), epochs=3, lr=1e-3,
                                val_configs=["HHH"], bn_configs=["HHH", "LLL"], bn_images=256)
    best = train(settings, progress=False).best_checkpoint
    rows = select(evaluate_checkpoints([best], ["HHH", "LLL"], progress=False))
    for row in rows:
        # Chance is 50 %; printed-photo cues are learnt within a few epochs.
        assert row["acer"] < 0.25, row
        assert row["auc"] > 0.85, row
