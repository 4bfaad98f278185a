"""Training engine: Table 2 sampling, settings, run folder, exact resume, BN recalibration."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from ptanet.train import batchnorm, loop
from ptanet.checkpoint import load_checkpoint
from ptanet.data import CropDataset
from ptanet.preprocess import Preprocess
from ptanet.configs import PAPER_SAMPLING, ConfigSampler
from ptanet.train.batchnorm import recalibrate_bn
from ptanet.train.loop import NonFiniteLossError, train
from ptanet.train.settings import TrainSettings, load_data, resolve_settings
from ptanet.models import is_pta, pta_mobilenet_v2


def tiny_settings(data, out, **kw):
    base = dict(data=str(data), out=str(out), cache=str(out.parent / "cache"), size=32, batch_size=4, epochs=2,
                val_configs=["HHH", "LLL"], bn_configs=["LLL", "BBB"], bn_images=8, prepare_workers=0, eval_batch_size=8)
    return resolve_settings(**{**base, **kw})


QUIET = dict(progress=False, log=lambda *_: None)


def kill_in_epoch3_then_resume(settings, per_epoch, monkeypatch):
    """Train ``settings`` (3 epochs), kill it in the first batch of epoch 3, resume it; return the
    resumed run's result."""
    real_sample = ConfigSampler.sample
    calls = {"n": 0}

    def dying_sample(self):
        calls["n"] += 1
        if calls["n"] == 2 * per_epoch + 1:
            raise KeyboardInterrupt
        return real_sample(self)

    monkeypatch.setattr(ConfigSampler, "sample", dying_sample)
    with pytest.raises(KeyboardInterrupt):
        train(settings, **QUIET)
    monkeypatch.setattr(ConfigSampler, "sample", real_sample)
    assert load_checkpoint(Path(settings.out) / "last.pt").train_state["epoch"] == 2
    return train(settings, resume=True, **QUIET)


def test_sampler_follows_table2_and_is_seeded():
    a = ConfigSampler(PAPER_SAMPLING, [0, 1])
    draws = Counter(a.sample() for _ in range(20000))
    assert set(draws) == set(PAPER_SAMPLING)  # B never trained
    for config, p in PAPER_SAMPLING.items():
        assert draws[config] / 20000 == pytest.approx(p, abs=0.015), config
    assert a.counts == dict(draws)
    b, c = ConfigSampler(PAPER_SAMPLING, [0, 1]), ConfigSampler(PAPER_SAMPLING, [0, 2])
    assert [b.sample() for _ in range(50)] != [c.sample() for _ in range(50)]
    # Any configuration and weights may be sampled.
    assert {ConfigSampler({"bbb": 1.0}, 0).sample()} == {"BBB"}


def test_sampler_same_seed_same_sequence():
    one = ConfigSampler(PAPER_SAMPLING, 7)
    two = ConfigSampler(PAPER_SAMPLING, 7)
    assert [one.sample() for _ in range(100)] == [two.sample() for _ in range(100)]


def test_balanced_class_weights_by_hand():
    # 3 live, 1 spoof: N / (2 N_c) = 4/6 and 4/2.
    torch.testing.assert_close(loop.balanced_class_weights([0, 0, 0, 1]), torch.tensor([2 / 3, 2.0]))
    with pytest.raises(ValueError, match="a class has no training images"):
        loop.balanced_class_weights([1, 1])
    with pytest.raises(ValueError, match="class_weights must be None or 'balanced'"):
        resolve_settings(class_weights="inverse")


def test_group_balanced_weights_by_hand():
    # groups (a, live): 3 images, (a, spoof): 1, (b, spoof): 2 -> weights 1/3, 1, 1/2 per image
    subjects, labels = ["a", "a", "a", "a", "b", "b"], [0, 0, 0, 1, 1, 1]
    w = loop.group_balanced_weights(subjects, labels)
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5], dtype=torch.float64))
    drawn = torch.multinomial(w, 30000, replacement=True, generator=torch.Generator().manual_seed(0)).tolist()
    per_group = Counter((subjects[i], labels[i]) for i in drawn)
    assert all(abs(n / 30000 - 1 / 3) < 0.02 for n in per_group.values()) and len(per_group) == 3
    with pytest.raises(ValueError, match="balance must be None or 'subject'"):
        resolve_settings(balance="class")


def test_balance_subject_draws_training_images_by_its_weights(tiny_synth, tmp_path, monkeypatch):
    # Weights that pick one image only: every image the epoch reads must then be that one.
    monkeypatch.setattr(loop, "group_balanced_weights",
                        lambda subjects, labels: torch.nn.functional.one_hot(torch.tensor(5), len(labels)).double())
    read = []
    real_getitem = CropDataset.__getitem__
    monkeypatch.setattr(CropDataset, "__getitem__", lambda self, i: read.append((self.augment, int(self.indices[i])))
                        or real_getitem(self, i))
    train(tiny_settings(tiny_synth, tmp_path / "bal", epochs=1, balance="subject", bn_configs=[], max_batches=3), **QUIET)
    rows = [row for augmented, row in read if augmented]
    assert len(rows) >= 12 and set(rows) == {5}  # 3 batches of 4 (the loop reads one more before it stops)


def test_defaults_are_the_papers_and_precedence(tmp_path):
    s = TrainSettings()
    assert (s.epochs, s.batch_size, s.lr, s.size, s.arch) == (20, 32, 1e-4, 128, "pta_mobilenet_v2")
    assert s.class_weights is None  # plain cross-entropy
    assert s.sampling == PAPER_SAMPLING and s.select_config == "HHH"
    yml = tmp_path / "s.yaml"
    yml.write_text("epochs: 5\nlr: 0.001\nval_configs: all\n")
    s = resolve_settings(str(yml), epochs=7, lr=None)
    assert (s.epochs, s.lr, len(s.val_configs)) == (7, 0.001, 27)
    with pytest.raises(ValueError, match="unknown setting.*'epoch'"):
        resolve_settings(epoch=3)
    with pytest.raises(ValueError, match="invalid PTA configuration 'HXH'"):
        resolve_settings(sampling={"HXH": 1.0})
    yml.write_text("- a list\n")
    with pytest.raises(ValueError, match="s.yaml: settings must be a mapping"):
        resolve_settings(str(yml))


def test_train_writes_run_folder_and_recalibrated_best(tiny_synth, tmp_path):
    s = tiny_settings(tiny_synth, tmp_path / "run")
    result = train(s, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]["val"]) == {"HHH", "LLL"}
    assert sum(history[0]["config_counts"].values()) > 0
    assert json.loads((run / "settings.json").read_text())["epochs"] == 2
    best = load_checkpoint(result.best_checkpoint)
    assert best.model.bn_configs == ["BBB", "LLL"]
    assert best.meta["settings"]["arch"] == "pta_mobilenet_v2"
    assert load_checkpoint(run / "last.pt").train_state["epoch"] == 2
    with pytest.raises(ValueError, match="already exists.*--resume"):
        train(s, progress=False, log=lambda *_: None)


def test_baseline_trains_with_same_command(tiny_synth, tmp_path):
    s = tiny_settings(tiny_synth, tmp_path / "base", arch="mobilenet_v2", epochs=1, class_weights="balanced", ema_decay=0.9,
                      box_scale=1.4)
    result = train(s, progress=False, log=lambda *_: None)
    assert set(result.history[0]["val"]) == {"No PTA"}
    assert "config_counts" not in result.history[0]
    assert "ema" in load_checkpoint(tmp_path / "base" / "last.pt").train_state  # the average works for it too
    best = load_checkpoint(result.best_checkpoint)
    assert not is_pta(best.model)
    assert Preprocess.from_dict(best.preprocess).box_scale == 1.4  # inference will crop as training did


def test_cli_train_flags_reach_the_settings(tmp_path, monkeypatch):
    from ptanet.cli import main

    seen = []
    monkeypatch.setattr(loop, "train", lambda settings, resume: seen.append((settings, resume)) or
                        loop.TrainResult(Path(settings.out), Path(settings.out) / "best.pt", 1, {}, []))
    yml = tmp_path / "r.yaml"
    yml.write_text("ema_decay: 0.9\nbox_scale: 1.2\nepochs: 3\n")
    assert main(["train", "--data", "d", "--out", str(tmp_path / "r"), "--config", str(yml), "--ema", "0.995",
                 "--box-scale", "1.5", "--zoom", "1.8", "--balance", "subject", "--bn-augment", "--class-weights", "balanced", "--resume"]) == 0
    settings, resume = seen[0]
    assert (settings.ema_decay, settings.box_scale, settings.epochs) == (0.995, 1.5, 3)  # flags over the file
    assert settings.zoom == 1.8 and settings.balance == "subject"
    assert settings.bn_augment and settings.class_weights == "balanced" and resume
    assert main(["train", "--data", "d", "--box-scale", "0"]) == 2  # refused before any work
    assert main(["train", "--data", "d", "--zoom", "0.5"]) == 2


def test_resume_after_kill_matches_uninterrupted_run(tiny_synth, tmp_path, monkeypatch):
    quiet = dict(progress=False, log=lambda *_: None)
    full = train(tiny_settings(tiny_synth, tmp_path / "full", epochs=3, bn_configs=[]), **quiet)

    per_epoch = sum(full.history[0]["config_counts"].values())
    resumed = kill_in_epoch3_then_resume(tiny_settings(tiny_synth, tmp_path / "killed", epochs=3, bn_configs=[]),
                                         per_epoch, monkeypatch)
    a = load_checkpoint(tmp_path / "full" / "last.pt").model.state_dict()
    b = load_checkpoint(tmp_path / "killed" / "last.pt").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert len((tmp_path / "killed" / "history.jsonl").read_text().splitlines()) == 3
    assert full.history[-1]["train_loss"] == resumed.history[-1]["train_loss"]


def test_cosine_schedule_decays_per_epoch_and_resumes_exactly(tiny_synth, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        resolve_settings(lr_schedule="step")
    quiet = dict(progress=False, log=lambda *_: None)
    kw = dict(epochs=3, bn_configs=[], lr_schedule="cosine", lr=1e-3, hflip=True, val_configs=["HHH"])
    full = train(tiny_settings(tiny_synth, tmp_path / "full", **kw), **quiet)
    # CosineAnnealingLR with T_max=3, stepped per epoch: lr * (1 + cos(pi * e / 3)) / 2 for e = 0, 1, 2.
    assert [h["lr"] for h in full.history] == pytest.approx([1e-3, 0.75e-3, 0.25e-3])

    per_epoch = sum(full.history[0]["config_counts"].values())  # killed in epoch 3, after two scheduler steps
    resumed = kill_in_epoch3_then_resume(tiny_settings(tiny_synth, tmp_path / "killed", **kw), per_epoch, monkeypatch)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]
    a = load_checkpoint(tmp_path / "full" / "last.pt").model.state_dict()
    b = load_checkpoint(tmp_path / "killed" / "last.pt").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_averages_every_iteration_is_what_best_keeps_and_resumes_exactly(tiny_synth, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        resolve_settings(ema_decay=1.0)
    kw = dict(epochs=3, bn_configs=[], ema_decay=0.9, lr=1e-3, val_configs=["HHH"])
    name = "classifier.1.weight"
    seen = []  # the trained weight after every iteration, as handed to the average
    real_update = loop.AveragedModel.update_parameters

    def recording_update(self, model):
        seen.append(model.state_dict()[name].clone())
        return real_update(self, model)

    monkeypatch.setattr(loop.AveragedModel, "update_parameters", recording_update)
    full = train(tiny_settings(tiny_synth, tmp_path / "full", **kw), **QUIET)
    monkeypatch.setattr(loop.AveragedModel, "update_parameters", real_update)
    per_epoch = sum(full.history[0]["config_counts"].values())
    expected, by_epoch = seen[0], {}
    for i, w in enumerate(seen):
        d = min(0.9, (1 + i) / (10 + i))  # warm-up: the i-th update after the first copy
        expected = w if i == 0 else d * expected + (1 - d) * w
        by_epoch[(i + 1) / per_epoch] = expected
    last = load_checkpoint(tmp_path / "full" / "last.pt")
    ema = last.train_state["ema"]
    assert int(ema["n_averaged"]) == len(seen) == 3 * per_epoch
    torch.testing.assert_close(ema[f"module.{name}"], expected)
    assert not torch.equal(ema[f"module.{name}"], last.model.state_dict()[name])  # the raw weights resume training
    best = load_checkpoint(full.best_checkpoint)  # the average at the best epoch, not the raw weights
    torch.testing.assert_close(best.model.state_dict()[name], by_epoch[best.meta["epoch"]])

    resumed = kill_in_epoch3_then_resume(tiny_settings(tiny_synth, tmp_path / "killed", **kw), per_epoch, monkeypatch)
    b = load_checkpoint(tmp_path / "killed" / "last.pt").train_state["ema"]
    assert all(torch.equal(ema[k], b[k]) for k in ema)
    assert [h["val"] for h in resumed.history] == [h["val"] for h in full.history]
    with pytest.raises(ValueError, match="trained with ema_decay"):
        train(tiny_settings(tiny_synth, tmp_path / "killed", **{**kw, "ema_decay": None, "epochs": 4}), resume=True, **QUIET)


def test_bn_augment_changes_only_the_recalibrated_statistics(tiny_synth, tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    plain = load_checkpoint(train(tiny_settings(tiny_synth, tmp_path / "plain", epochs=1), **quiet).best_checkpoint)
    aug = load_checkpoint(train(tiny_settings(tiny_synth, tmp_path / "aug", epochs=1, bn_augment=True), **quiet).best_checkpoint)
    a, b = plain.model.state_dict(), aug.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same training; shared statistics untouched
    assert aug.meta["settings"]["bn_augment"] is True
    for config in ("LLL", "BBB"):
        ours, theirs = plain.model.bn_stats()[config], aug.model.bn_stats()[config]
        assert ours.keys() == theirs.keys()
        assert not all(torch.equal(ours[n][0], theirs[n][0]) for n in ours)  # means differ


def test_augmented_recalibration_zooms_as_training_did(tiny_synth, tmp_path):
    # Same weights, augmented recalibration with and without the zoom: the statistics must differ.
    run = train(tiny_settings(tiny_synth, tmp_path / "z", epochs=1, zoom=2.0, bn_augment=True, bn_configs=["LLL"]), **QUIET)
    zoomed = load_checkpoint(run.best_checkpoint)
    assert zoomed.meta["bn_recalibration"]["zoom"] == 2.0
    ours = {n: (m.clone(), v.clone()) for n, (m, v) in zoomed.model.bn_stats()["LLL"].items()}
    data = load_data(resolve_settings(**zoomed.meta["settings"]), progress=False)
    batchnorm.recalibrate_and_save(zoomed, tmp_path / "unzoomed.pt", data["train"], ["LLL"], 8, True, 0, False,
                                 lambda *_: None, zoom=1.0)
    unzoomed = load_checkpoint(tmp_path / "unzoomed.pt")
    theirs = unzoomed.model.bn_stats()["LLL"]
    assert not all(torch.equal(ours[n][0], theirs[n][0]) for n in ours)


def test_recalibrate_checkpoint_equals_recalibration_in_training(tiny_synth, tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    in_training = train(tiny_settings(tiny_synth, tmp_path / "a", epochs=1, bn_augment=True, bn_configs=["LLL"]), **quiet)
    without = train(tiny_settings(tiny_synth, tmp_path / "b", epochs=1, bn_configs=[]), **quiet)
    before = (tmp_path / "b" / "best.pt").read_bytes()
    out = batchnorm.recalibrate_checkpoint(without.best_checkpoint, tmp_path / "b" / "recal.pt", configs=["lll"], augment=True, **quiet)
    assert (tmp_path / "b" / "best.pt").read_bytes() == before  # the original is untouched
    a, b = load_checkpoint(in_training.best_checkpoint), load_checkpoint(out)
    assert b.model.bn_configs == ["LLL"] and b.meta["bn_recalibration"] == {"configs": ["LLL"], "images": 8, "augment": True,
                                                                      "zoom": 1.0}
    assert a.meta["bn_recalibration"] == b.meta["bn_recalibration"]
    for n, (mean, var) in a.model.bn_stats()["LLL"].items():
        torch.testing.assert_close(b.model.bn_stats()["LLL"][n], (mean, var))
    base = train(tiny_settings(tiny_synth, tmp_path / "c", epochs=1, arch="mobilenet_v2"), **quiet)
    with pytest.raises(ValueError, match="has no configurations to recalibrate"):
        batchnorm.recalibrate_checkpoint(base.best_checkpoint, **quiet)


def test_shipped_recipes_resolve(tmp_path):
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    shipped = {"nuaa_all_subjects.yaml": (None, 1.0, 1.0), "nuaa_all_subjects_ema.yaml": (0.995, 1.0, 1.0),
               "nuaa_context.yaml": (None, 1.5, 1.0), "nuaa_zoom.yaml": (None, 1.8, 1.8)}
    assert sorted(p.name for p in recipes.glob("*.yaml")) == sorted([*shipped, "nuaa_recommended.yaml"])  # a new recipe gets checked here
    for name, (ema_decay, box_scale, zoom) in shipped.items():
        s = resolve_settings(str(recipes / name))
        assert (s.val_split, s.val_fraction, s.bn_augment, s.ema_decay, s.box_scale, s.zoom) == (
            "random", 0.1, True, ema_decay, box_scale, zoom)
        assert (s.epochs, s.lr, s.sampling) == (20, 1e-4, PAPER_SAMPLING)  # otherwise the paper's
    # The recommended recipe is the paper's: the defaults, nothing changed.
    assert resolve_settings(str(recipes / "nuaa_recommended.yaml")) == resolve_settings()


def test_non_finite_loss_stops_with_checkpoints_intact(tiny_synth, tmp_path, monkeypatch):
    s = tiny_settings(tiny_synth, tmp_path / "nan", epochs=1)
    train(s, progress=False, log=lambda *_: None)
    real = torch.nn.functional.cross_entropy

    def nan_loss(logits, labels, *a, **k):
        out = real(logits, labels, *a, **k)
        return out * float("nan") if out.dim() == 0 and logits.requires_grad else out

    monkeypatch.setattr(loop.F, "cross_entropy", nan_loss)
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 1.*loss is nan.*last.pt holds the last finished epoch"):
        train(tiny_settings(tiny_synth, tmp_path / "nan", epochs=2), resume=True, progress=False, log=lambda *_: None)
    assert load_checkpoint(tmp_path / "nan" / "last.pt").train_state["epoch"] == 1


def test_recalibrate_bn_is_the_mean_over_the_crops(tiny_synth, tmp_path):
    s = tiny_settings(tiny_synth, tmp_path / "x")
    data = load_data(s, progress=False)
    dataset = CropDataset(data["train"], Preprocess(size=32))
    torch.manual_seed(0)
    model = pta_mobilenet_v2().eval()
    shared_name = model.adaptive_bn_names[0]
    shared = model.get_buffer(shared_name + ".running_mean").clone()
    recalibrate_bn(model, dataset, ["LLL"], num_images=8, batch_size=4, progress=False)
    # The stored mean is the average of that BN's input over the 8 crops (equal batches of 4).
    layer = model.get_submodule(shared_name)
    seen = []
    handle = layer.register_forward_hook(lambda m, inp, out: seen.append(inp[0].mean(dim=(0, 2, 3))))
    idx = torch.as_tensor(__import__("numpy").random.default_rng(0).choice(len(dataset), size=8, replace=False))
    with torch.no_grad(), model.using("LLL"):
        for chunk in idx.split(4):
            model(torch.stack([dataset[int(i)][0] for i in chunk]))
    handle.remove()
    model.set_config("LLL")
    torch.testing.assert_close(layer.running_mean, torch.stack(seen).mean(0), rtol=1e-4, atol=1e-5)
    model.set_config("HHH")  # other configurations keep what training left
    torch.testing.assert_close(model.get_buffer(shared_name + ".running_mean"), shared)
    assert model.bn_configs == ["LLL"] and model.config == "HHH"


def test_every_setting_is_a_flag_and_settings_are_stored_with_absolute_paths(tmp_path, monkeypatch):
    import dataclasses

    from ptanet.cli import _build_parser
    from ptanet.train.settings import SAFE_ON_RESUME

    train_parser = _build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest: a for a in train_parser._actions}
    for f in dataclasses.fields(TrainSettings):
        assert f.name in dests, f"setting {f.name} has no flag"
        assert f.metadata["help"] and f.metadata["group"] in ("data", "model", "optimisation", "output")
        assert ("[may change on --resume]" in dests[f.name].help) == (f.name in SAFE_ON_RESUME)
    monkeypatch.chdir(tmp_path)
    s = resolve_settings(data="d", out="runs/x", cache="c")
    assert (s.data, s.out, s.cache) == tuple(str(tmp_path / p) for p in ("d", "runs/x", "c"))
    assert resolve_settings(bn_configs="none").bn_configs == []
    assert resolve_settings(sampling="HHH=3,LLL=1").sampling == {"HHH": 3.0, "LLL": 1.0}
