"""The stored decision threshold: its forms, which one applies to a configuration, bad records."""

import pytest

from ptanet.cli import main
from ptanet.threshold import check_threshold, threshold_for


def test_threshold_for_each_stored_form():
    assert threshold_for(None, "HHH") is None
    assert threshold_for(0.3, "LLL") == 0.3 and threshold_for(0.3, None) == 0.3
    calibrated = {"value": 0.4, "rule": "eer", "data": "camera", "n": 9, "config": "HHH"}
    assert threshold_for(calibrated, "LLL") == 0.4
    per_config = {"value": 0.6, "per_config": {"HHH": 0.6, "LLL": 0.2, "No PTA": 0.7}, "rule": "eer"}
    assert threshold_for(per_config, "LLL") == 0.2 and threshold_for(per_config, "BBB") == 0.6
    assert threshold_for(per_config, None) == 0.7
    assert threshold_for({"per_config": {"HHH": 0.6}}, "LLL") is None  # nothing that applies


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "0.5", True, {"value": 2}, {"per_config": {"HHH": "x"}},
                                 {"per_config": []}, {}, [0.5]])
def test_bad_stored_thresholds_name_the_file(bad):
    with pytest.raises(ValueError, match="model.pt: stored threshold"):
        check_threshold(bad, "model.pt")


def test_train_threshold_from_a_folder_without_cross_validation_fails_before_training(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--threshold-from", str(tmp_path / "cv"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "no out-of-fold scores" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()
