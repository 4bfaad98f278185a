"""Devices and torchrun data parallelism: device selection, the rank batch sampler, DDP on the CPU (gloo,
two processes started here) against one process, resume under DDP, and CUDA-only checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import RandomSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from ptanet.checkpoint import load_checkpoint
from ptanet.configs import ConfigSampler
from ptanet.data import CropDataset
from ptanet.models import CHANNELS_LAST, create_model, pta_mobilenet_v2, to_fast_layout
from ptanet.train import loop
from ptanet.train.device import resolve_device, resolve_precision
from ptanet.train.distill import TeacherAndSampled, distillation_loss
from ptanet.train.distributed import Distributed, RankBatchSampler, UnusedBranches
from ptanet.train.settings import load_data, resolve_settings

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here); scripts/gpu-check.sh runs these")
QUIET = dict(progress=False, log=lambda *_: None)


def ddp_settings(data: Path, out: Path, **kw) -> dict:
    base = dict(data=str(data), out=str(out), cache=str(out.parent / "cache"), size=32, batch_size=8, epochs=1,
                max_batches=3, augment=False, val_configs=["HHH"], bn_configs=[], prepare_workers=0, eval_batch_size=16,
                device="cpu", lr=1e-3)
    return {**base, **kw}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, runs: list[tuple[dict, bool]], out_dir: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then ``train`` for each run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # One group for all runs (train then joins it rather than starting its own each time).
    torch.distributed.init_process_group("gloo")
    drawn, models = [], []
    real_sample, real_create = ConfigSampler.sample, loop.create_model

    def recording_sample(self):
        drawn.append(real_sample(self))
        return drawn[-1]

    def no_dropout_create(name, **kw):  # dropout masks are drawn per rank: off, to compare with one process
        models.append(real_create(name, dropout=0.0, **kw))
        return models[-1]

    ConfigSampler.sample = recording_sample
    loop.create_model = no_dropout_create
    for i, (kw, resume) in enumerate(runs):
        drawn.clear()
        loop.train(resolve_settings(**kw), resume=resume, **QUIET)
        params = {n: p.detach().clone() for n, p in models[-1].named_parameters()}
        torch.save({"params": params, "configs": list(drawn)}, Path(out_dir) / f"run{i}-rank{rank}.pt")
    torch.distributed.destroy_process_group()


def run_ranks(runs: list[tuple[dict, bool]], out_dir: Path, world: int = 2) -> list[list[dict]]:
    """Start ``world`` CPU processes (gloo) that train ``runs`` in turn; per run, what each rank saw."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, _free_port(), runs, str(out_dir)), nprocs=world, join=True)
    return [[torch.load(out_dir / f"run{i}-rank{r}.pt", weights_only=True) for r in range(world)]
            for i in range(len(runs))]


def one_process_reference(kw: dict, world: int = 2) -> tuple[dict, list[str]]:
    """What DDP computes, in one process: the same global batches in the same order and the same
    configurations; each global batch as ``world`` shares whose mean gradient makes the step."""
    settings = resolve_settings(**kw)
    data = load_data(settings, progress=False)
    train_set = CropDataset(data["train"], settings.preprocess, augment=False)
    torch.manual_seed(settings.seed)
    model = to_fast_layout(create_model(settings.arch, dropout=0.0))
    model.clear_bn_stats()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    model.train()
    configs = []
    for epoch in range(1, settings.epochs + 1):
        loader = loop.make_train_loader(train_set, settings, epoch, None, Distributed(), 0)
        sampler = ConfigSampler(settings.sampling, [settings.seed, epoch, 2])
        # Wrapped as the loop wraps it: tqdm.auto's wrapper starts one iterator of its own, which draws
        # the loader's worker seed from the order's generator once more.
        for step, (images, labels) in enumerate(tqdm(loader, disable=True)):
            if step >= settings.max_batches:
                break
            configs.append(sampler.sample())
            model.set_config(configs[-1])
            optimizer.zero_grad(set_to_none=True)
            for part, part_labels in zip(images.chunk(world), labels.chunk(world)):
                part = part.contiguous(memory_format=CHANNELS_LAST)
                if settings.distill:
                    loss = distillation_loss(*TeacherAndSampled(model, settings.distill)(part, configs[-1]), part_labels)
                else:
                    loss = F.cross_entropy(model(part), part_labels)
                (loss / world).backward()
            if settings.distill:  # branches neither configuration ran get no step, as under DDP
                for p in UnusedBranches(model, "zero", teacher=settings.distill).inactive():
                    p.grad = None
            optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}, configs


def assert_params_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# --- devices ---------------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is usable here.*--device cpu"):
        resolve_device("cuda")
    from ptanet.cli import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptanet train: error: device 'cuda' asked for") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_precision_is_fp32_on_the_cpu_and_mixed_only_on_cuda():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    with pytest.raises(ValueError, match="precision 'fp16' is for CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_settings(device="tpu")


# --- the pieces of data parallelism ------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
def test_rank_shares_of_each_global_batch_are_the_one_process_batch(weighted):
    def sampler():  # fresh, identically seeded: the order every rank draws
        g = torch.Generator().manual_seed(3)
        if weighted:  # --balance subject's draw, with replacement
            return WeightedRandomSampler(torch.linspace(0.1, 1.0, 50, dtype=torch.float64), 50, generator=g)
        return RandomSampler(range(50), generator=g)

    one = list(RankBatchSampler(sampler(), 12))
    assert len(one) == 4 and all(len(b) == 12 for b in one)  # the incomplete last batch is dropped
    shares = [list(RankBatchSampler(sampler(), 12, rank, 3)) for rank in range(3)]
    assert [sum((s[i] for s in shares), []) for i in range(4)] == one
    assert len(shares[1]) == 4 and all(len(b) == 4 for b in shares[1])
    with pytest.raises(ValueError, match="batch_size 10 is the global batch.*multiple of 4"):
        RankBatchSampler(sampler(), 10, 0, 4)


def test_zero_contribution_leaves_the_inactive_branches_without_gradient():
    torch.manual_seed(0)
    model = pta_mobilenet_v2().set_config("LHH")
    unused = UnusedBranches(model, "zero")
    blocks = model.pta_blocks
    expected = {id(p) for p in [*blocks[0].heavy.parameters(), *blocks[1].light.parameters(),
                                *blocks[2].light.parameters()]}
    assert {id(p) for p in unused.inactive()} == expected
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    with_term = unused.loss(loss)
    assert with_term.item() == loss.item()
    with_term.backward()
    assert all(p.grad is not None and not p.grad.any() for p in unused.inactive())  # what DDP then reduces
    unused.drop_zero_grads()
    assert all(p.grad is None for p in unused.inactive())
    assert all(p.grad is not None for p in model.parameters() if id(p) not in expected)
    assert UnusedBranches(model.set_config("BBB"), "zero").inactive() == []


# --- two processes with gloo ---------------------------------------------------------------------
# The reference runs single-threaded like the ranks: Adam's first steps (about lr times the sign of
# each gradient) turn a different float summation order into visible differences.
def test_two_processes_match_one_process_and_each_other(tiny_synth, tmp_path, one_torch_thread):
    kw = ddp_settings(tiny_synth, tmp_path / "ddp")
    (ranks,) = run_ranks([(kw, False)], tmp_path / "seen")
    reference, configs = one_process_reference(kw)
    assert ranks[0]["configs"] == ranks[1]["configs"] == configs  # the same branches on every rank
    assert len(set(configs)) > 1 or len(configs) == 3
    assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in reference)
    assert_params_close(ranks[0]["params"], reference)
    saved = load_checkpoint(tmp_path / "ddp" / "last.pt").model.state_dict()  # rank 0 wrote it
    assert all(torch.equal(saved[n], ranks[0]["params"][n]) for n in reference)
    assert (tmp_path / "ddp" / "best.pt").exists()
    assert len((tmp_path / "ddp" / "history.jsonl").read_text().splitlines()) == 1


def test_distillation_under_ddp_matches_one_process(tiny_synth, tmp_path, one_torch_thread):
    # LLL and HLH only: with the teacher HHH some branches are used, some by neither (no step for them).
    kw = ddp_settings(tiny_synth, tmp_path / "distill", distill="HHH", sampling={"LLL": 0.5, "HHH": 0.25, "HLH": 0.25})
    (ranks,) = run_ranks([(kw, False)], tmp_path / "seen")
    reference, configs = one_process_reference(kw)
    assert ranks[0]["configs"] == ranks[1]["configs"] == configs
    assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in reference)
    assert_params_close(ranks[0]["params"], reference)


@pytest.mark.slow
def test_find_unused_parameters_gives_the_same_weights(tiny_synth, tmp_path, one_torch_thread):
    kw = ddp_settings(tiny_synth, tmp_path / "find", ddp_unused="find", max_batches=4)
    (ranks,) = run_ranks([(kw, False)], tmp_path / "seen")
    reference, configs = one_process_reference(kw)
    assert ranks[0]["configs"] == configs
    assert_params_close(ranks[0]["params"], reference)


@pytest.mark.slow
def test_resume_under_ddp_gives_the_uninterrupted_weights(tiny_synth, tmp_path):
    full = ddp_settings(tiny_synth, tmp_path / "full", epochs=2, balance="subject")
    first = ddp_settings(tiny_synth, tmp_path / "resumed", epochs=1, balance="subject")
    runs = run_ranks([(full, False), (first, False), ({**first, "epochs": 2}, True)], tmp_path / "seen")
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert b.train_state["epoch"] == 2 and [h["epoch"] for h in b.train_state["history"]] == [1, 2]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    per_epoch = len(runs[0][0]["configs"]) // 2
    assert runs[0][0]["configs"][per_epoch:] == runs[2][0]["configs"] == runs[2][1]["configs"]  # epoch 2's draws


@pytest.mark.slow
def test_torchrun_runs_the_cli(tiny_synth, tmp_path):
    """The documented command itself: ``torchrun --nproc-per-node 2 -m ptanet train ...``."""
    run = tmp_path / "tr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "ptanet", "train", "--data", str(tiny_synth), "--out", str(run), "--cache", str(tmp_path / "cache"),
           "--size", "32", "--batch-size", "8", "--epochs", "1", "--max-batches", "2", "--val-configs", "HHH",
           "--bn-configs", "LLL", "--bn-images", "8", "--prepare-workers", "0", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(run / "best.pt").model.bn_configs == ["LLL"]
    assert done.stdout.count("best epoch 1") == 1  # rank 0 reports for the run


# --- CUDA ----------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_training_with_mixed_precision_writes_cpu_checkpoints(tiny_synth, tmp_path):
    kw = ddp_settings(tiny_synth, tmp_path / "gpu", device="cuda", epochs=2, augment=True, bn_configs=["LLL"],
                      bn_images=8, workers=2)
    result = loop.train(resolve_settings(**kw), **QUIET)
    best = load_checkpoint(result.best_checkpoint)
    assert best.model.bn_configs == ["LLL"] and next(best.model.parameters()).device.type == "cpu"
    assert all(t.device.type == "cpu" for m, v in best.model.bn_stats()["LLL"].values() for t in (m, v))
    last = load_checkpoint(tmp_path / "gpu" / "last.pt")
    assert ("scaler" in last.train_state) == (not torch.cuda.is_bf16_supported())  # fp16 needs its scaler
    resumed = loop.train(resolve_settings(**{**kw, "epochs": 3}), resume=True, **QUIET)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


@needs_cuda
def test_prediction_and_recalibration_on_cuda_match_the_cpu(tiny_synth, tmp_path):
    from ptanet.evaluate import predict
    from ptanet.train.batchnorm import recalibrate_bn

    settings = resolve_settings(**ddp_settings(tiny_synth, tmp_path / "x"))
    data = load_data(settings, progress=False)
    dataset = CropDataset(data["train"], settings.preprocess)
    torch.manual_seed(0)
    cpu_model = pta_mobilenet_v2()
    gpu_model = pta_mobilenet_v2()
    gpu_model.load_state_dict(cpu_model.state_dict())
    recalibrate_bn(cpu_model, dataset, ["LLL"], num_images=16, progress=False)
    recalibrate_bn(gpu_model, dataset, ["LLL"], num_images=16, progress=False, device="cuda")
    for config in ("HHH", "LLL"):
        cpu_model.set_config(config), gpu_model.set_config(config)
        cpu_scores, cpu_loss = predict(cpu_model, dataset)
        gpu_scores, gpu_loss = predict(gpu_model, dataset)
        torch.testing.assert_close(torch.as_tensor(gpu_scores), torch.as_tensor(cpu_scores), rtol=1e-3, atol=1e-4)
    assert resolve_precision("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)


# --- the training-speed benchmark ------------------------------------------------------------------
def test_bench_train_measures_every_part_for_both_models(tiny_synth, tmp_path, capsys, one_torch_thread):
    from ptanet.cli import main

    settings = resolve_settings(**ddp_settings(tiny_synth, tmp_path / "b"))
    load_data(settings, progress=False)
    out = tmp_path / "speed"
    assert main(["bench-train", str(settings.cache_dir / "train"), "--batch-size", "4", "--steps", "2", "--warmup", "1",
                 "--repeats", "1", "--device", "cpu", "--epoch-images", "1000", "--out", str(out)]) == 0
    import json

    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["part"]) for r in rows] == [("(any)", "loader")] + [
        (m, p) for m in ("PTA (Table 2 sampling)", "No PTA") for p in ("model", "both")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["epoch_min"] == pytest.approx(1000 / r["images_per_s"] / 60)
        assert (r["device"], r["processes"], r["batch_size"], r["precision"]) == ("cpu", 1, 4, "fp32")
    pta = {r["part"]: r for r in rows if r["model"].startswith("PTA")}
    no_pta = {r["part"]: r for r in rows if r["model"] == "No PTA"}
    assert pta["both"]["ratio"] == pytest.approx(no_pta["both"]["images_per_s"] / pta["both"]["images_per_s"])
    assert "| PTA (Table 2 sampling) | model |" in capsys.readouterr().out
