"""The training loop (the paper's recipe): one run trains one model.

For a PTA model each iteration samples one configuration from the paper's Table 2 distribution and
runs forward/backward through it alone. Every random choice of an epoch (shuffle order, augmentation,
dropout, configuration draws) is seeded from ``(seed, epoch)``, so a run resumed from its last
checkpoint ends with the same weights as one that was never interrupted. Reading order: set-up, resume,
then per epoch train, validate and select, save; at the end per-configuration BatchNorm statistics.

The same loop runs on CUDA (``ptanet.train.device``) and as one of torchrun's processes
(``ptanet.train.distributed``): there rank 0 alone validates, logs and writes, and the others wait.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from ptanet.atomic import write_json_atomic
from ptanet.checkpoint import load_checkpoint, save_checkpoint
from ptanet.configs import BASELINE_LABEL, ConfigSampler
from ptanet.data import CropDataset
from ptanet.scoring import validate
from ptanet.metrics import selection_key
from ptanet.models import CHANNELS_LAST, MobileNetV2, create_model, is_pta, to_fast_layout
from ptanet.train.batchnorm import recalibrate_and_save
from ptanet.data.dataset import describe_data
from ptanet.train import distributed
from ptanet.train.distill import TeacherAndSampled, distillation_loss
from ptanet.train.device import Precision, default_workers, loader_options, resolve_precision, to_device
from ptanet.train.settings import SAFE_ON_RESUME, TrainSettings, load_data, resolve_settings


class NonFiniteLossError(RuntimeError):
    pass


def balanced_class_weights(labels: np.ndarray, num_classes: int = 2) -> torch.Tensor:
    """``N / (num_classes * N_c)`` per class: every class contributes the same total weight."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"cannot balance classes: a class has no training images (counts {counts.tolist()})")
    return torch.as_tensor(counts.sum() / (num_classes * counts), dtype=torch.float32)


def group_balanced_weights(subjects: list[str], labels: np.ndarray) -> torch.Tensor:
    """Sampling weight per image, ``1 / size of its (subject, label) group``: every group present is
    drawn equally often by a WeightedRandomSampler."""
    groups = list(zip(subjects, np.asarray(labels).tolist()))
    sizes = Counter(groups)
    return torch.as_tensor([1.0 / sizes[g] for g in groups], dtype=torch.float64)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def json_line(record: dict) -> str:
    """One JSON line; NaN (an undefined rate) is written as null, since bare NaN is not JSON."""
    return json.dumps(_nan_to_none(record), allow_nan=False) + "\n"


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def append_json_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json_line(record))
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temporaries(run: Path) -> None:
    """Temporary files left by a kill during an atomic write (``.last.pt.*.tmp``) are never valid."""
    for tmp in run.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_val: dict
    history: list[dict]


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings):
    """The learning-rate schedule, stepped once per epoch; ``None`` for the paper's constant rate."""
    if settings.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    return None


def make_ema(model: MobileNetV2, settings: TrainSettings) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights and buffers, or ``None`` (the paper)."""
    if settings.ema_decay is None:
        return None
    # Buffers too: the average's BatchNorm statistics then follow its weights.
    return AveragedModel(model, multi_avg_fn=_warmed_up_ema(settings.ema_decay), use_buffers=True)


def _warmed_up_ema(decay: float):
    """``multi_avg_fn`` for AveragedModel: an EMA whose decay after ``n`` updates is
    ``min(decay, (1 + n) / (10 + n))`` (the ``num_updates`` rule of TensorFlow's ExponentialMovingAverage).

    Without it (torch's ``get_ema_multi_avg_fn``) the first copy lingers with weight ``decay**t``: with
    0.995 after 750 iterations that is 2 % of BatchNorm's initial variance of 1 in every running
    variance, many times the true variance of a depthwise layer, and the average predicted one class
    (measured on nuaa-dev)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:  # BatchNorm's batch counters: follow the model
                a.copy_(c)

    return update


def check_resumable(last_path: Path, stored: dict, settings: TrainSettings) -> None:
    """Refuse to resume a run with settings that change what it computes (naming each, old and new);
    those marked ``safe_on_resume`` (more epochs, workers, ...) may differ."""
    try:
        stored_settings = resolve_settings(**stored)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{last_path}: the run's stored settings are not valid here ({exc})") from None
    if (stored_settings.ema_decay is None) != (settings.ema_decay is None):
        raise ValueError(f"{last_path}: this run was trained {'without' if stored_settings.ema_decay is None else 'with'} "
                         "ema_decay; resume it with the same setting")
    old, new = stored_settings.to_dict(), settings.to_dict()
    changed = [f"{name} {old[name]!r} -> {new[name]!r}" for name in new
               if name not in SAFE_ON_RESUME and old[name] != new[name]]
    if changed:
        raise ValueError(f"{last_path}: cannot resume with changed settings ({'; '.join(changed)}); only "
                         f"{', '.join(sorted(SAFE_ON_RESUME))} may change. Resume with the run's own settings or "
                         "start a new run in another --out")


def run_settings(config_file: str | Path | None = None, resume: bool = False, **overrides) -> TrainSettings:
    """The settings of ``ptanet train``: the defaults, then ``config_file``, then ``overrides``. Resuming
    a run that has a ``last.pt``, its own settings take the defaults' place, so only what is given
    again can differ (and ``train`` refuses what may not)."""
    settings = resolve_settings(config_file, **overrides)
    last_path = Path(settings.out) / "last.pt"
    if not (resume and last_path.exists()):
        return settings
    stored = load_checkpoint(last_path).meta.get("settings") or {}
    try:
        return resolve_settings(config_file, base=stored, **{**overrides, "out": settings.out})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{last_path}: the run's stored settings are not valid here ({exc})") from None


def make_train_loader(train_set: CropDataset, settings: TrainSettings, epoch: int, draw_weights: torch.Tensor | None,
                      dist: distributed.Distributed, workers: int) -> DataLoader:
    """The epoch's loader: the one-process order (a shuffle seeded from (seed, epoch), or the weighted
    draw of --balance) cut into global batches, of which this rank reads its share."""
    order = torch.Generator().manual_seed(_epoch_seed(settings.seed, epoch, 1))
    # As many draws per epoch as images, so epochs stay comparable with the paper's shuffle.
    sampler = (WeightedRandomSampler(draw_weights, len(train_set), replacement=True, generator=order)
               if draw_weights is not None else RandomSampler(train_set, generator=order))
    batches = distributed.RankBatchSampler(sampler, settings.batch_size, dist.rank, dist.world_size)
    # generator=order as DataLoader(shuffle=True, generator=order) had it: the loader draws its worker
    # seed from it before the shuffle, so one-process runs keep their exact order.
    return DataLoader(train_set, batch_sampler=batches, generator=None if draw_weights is not None else order,
                      **loader_options(dist.device, workers, settings.prefetch))


def train(settings: TrainSettings, resume: bool = False, progress: bool = True, log=print) -> TrainResult:
    """Train one model with ``settings``; write the run folder; return where the best model is.

    With ``resume`` an interrupted run continues from ``last.pt`` (losing at most the epoch that
    was in progress) and ends with the same weights as an uninterrupted one. Started by torchrun,
    this process is one rank of a data-parallel run (``ptanet.train.distributed``).
    """
    dist = distributed.start(settings.device)
    try:
        return _train(settings, resume, progress, log, dist)
    finally:
        dist.close()


def _train(settings: TrainSettings, resume: bool, progress: bool, log, dist: distributed.Distributed) -> TrainResult:
    if not settings.data:
        raise ValueError("no data given: set `data` (a CelebA-Spoof root or a live/spoof folder)")
    device = dist.device
    if not dist.is_main:  # one voice: rank 0 logs and shows progress
        progress, log = False, (lambda *_: None)
    run = Path(settings.out)
    last_path, best_path, history_path = run / "last.pt", run / "best.pt", run / "history.jsonl"
    if not resume and last_path.exists():
        raise ValueError(f"{run}: a run already exists there; pass --resume to continue it or choose another --out")
    last = load_checkpoint(last_path) if resume and last_path.exists() else None
    if last is not None:
        check_resumable(last_path, last.meta.get("settings", {}), settings)
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run)
        write_json_atomic(run / "settings.json", settings.to_dict(), indent=2)

    # --- set-up: data, model, optimiser ---------------------------------------------------------
    # Each node's first process prepares the cache; the others then open what it wrote.
    data = load_data(settings, progress) if dist.local_rank == 0 else None
    dist.barrier()
    data = data or load_data(settings, progress=False)
    for line in describe_data(data):
        log(line)
    preprocess = settings.preprocess
    # stream=rank: each rank's augmentation draws differ (rank 0's are a single process's).
    train_set = CropDataset(data["train"], preprocess, augment=settings.augment, seed=settings.seed, hflip=settings.hflip,
                            affine=settings.affine, zoom=settings.zoom, stream=dist.rank)
    val_set = CropDataset(data["val"], preprocess, augment=False)
    if len(train_set) < settings.batch_size:
        raise ValueError(f"batch_size {settings.batch_size} is larger than the training part ({len(train_set)} images): "
                         "no full batch, so no step would run; lower --batch-size")
    workers = settings.workers if settings.workers is not None else default_workers(device, dist.local_world_size)
    precision = Precision(device, resolve_precision(settings.precision, device))
    if dist.enabled or device.type != "cpu":
        log(f"training on {device} in {precision.name}"
            + (f", {dist.world_size} processes of {settings.batch_size // dist.world_size} images "
               f"(global batch {settings.batch_size})" if dist.enabled else "") + f", {workers} loader workers each")
    torch.manual_seed(settings.seed)  # weight initialisation
    model = to_fast_layout(create_model(settings.arch, width_mult=settings.width_mult))
    if is_pta(model):
        model.clear_bn_stats()
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = make_scheduler(optimizer, settings)
    ema = make_ema(model, settings)
    kept = ema.module if ema is not None else model  # what is validated and kept as best.pt
    loss_weight = balanced_class_weights(data["train"].labels) if settings.class_weights == "balanced" else None
    if loss_weight is not None:
        loss_weight = loss_weight.to(device)
    draw_weights = (group_balanced_weights(data["train"].subjects, data["train"].labels)
                    if settings.balance == "subject" else None)

    # --- resume ---------------------------------------------------------------------------------
    history: list[dict] = []
    start_epoch, best_epoch, best_key = 1, 0, (math.inf, math.inf)
    if last is not None:
        state = last.train_state or {}
        model.load_state_dict(last.model.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if precision.scaler.is_enabled() and "scaler" in state:
            precision.scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        best_key, best_epoch = tuple(state["best_key"]), state["best_epoch"]
        start_epoch = state["epoch"] + 1
        log(f"resuming {run} after epoch {state['epoch']}")
    # The checkpoint is the truth: rewrite the history it knows (drops a line from a killed epoch).
    if dist.is_main:
        history_path.write_text("".join(json_line(h) for h in history))

    # --- execution: the module each step runs (DDP over the model, optionally compiled) -------------
    distill = settings.distill if is_pta(model) else None
    net, unused = (TeacherAndSampled(model, distill) if distill else model), None
    if dist.enabled:
        unused = distributed.UnusedBranches(model, settings.ddp_unused, teacher=distill)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused.find_unused_parameters)
    if settings.compile:
        net = torch.compile(net)
    # On the GPU every .item() waits for the queue to drain: check and report every few steps only.
    check_every = 1 if device.type == "cpu" else 25

    select_key = settings.select_config if is_pta(model) else BASELINE_LABEL
    val_configs = list(dict.fromkeys([settings.select_config, *settings.val_configs]))
    meta = {"settings": settings.to_dict()}
    epochs = tqdm(range(start_epoch, settings.epochs + 1), desc=f"train {settings.arch}", disable=not progress,
                  initial=start_epoch - 1, total=settings.epochs)
    for epoch in epochs:
        # --- one epoch: every random choice seeded from (seed, epoch) ---------------------------
        torch.manual_seed(_epoch_seed(settings.seed, epoch, 0))  # dropout
        train_set.set_epoch(epoch)
        loader = make_train_loader(train_set, settings, epoch, draw_weights, dist, workers)
        # Seeded alike on every rank and drawn once per global step: all ranks run the same branches.
        sampler = ConfigSampler(settings.sampling, [settings.seed, epoch, 2]) if is_pta(model) else None
        n_batches = len(loader) if settings.max_batches is None else min(len(loader), settings.max_batches)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        t0, seen = time.perf_counter(), 0
        # Sums stay on the device (float64 as Python's float was), read once per check.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(loader, total=n_batches, desc=f"epoch {epoch}", leave=False, disable=not progress)
        for step, (images, labels) in enumerate(bar):
            if step >= n_batches:
                break
            config = sampler.sample() if sampler else None
            images, labels = to_device(images, labels, device, CHANNELS_LAST)
            if distill:
                with precision.autocast():
                    teacher_logits, sampled_logits = net(images, config)
                loss = distillation_loss(teacher_logits, sampled_logits, labels, loss_weight)
                logits = teacher_logits if sampled_logits is None else sampled_logits
            else:
                if config:
                    model.set_config(config)
                with precision.autocast():
                    logits = net(images)
                loss = F.cross_entropy(logits.float(), labels, weight=loss_weight)
            bad |= ~torch.isfinite(loss.detach())
            if (step + 1) % check_every == 0 or step + 1 == n_batches:
                if dist.any(bad):
                    raise NonFiniteLossError(
                        f"epoch {epoch}, batch {step + 1}{f' ({config})' if config else ''}: loss is {loss.item()}"
                        f"{'' if dist.world_size == 1 else ' on some process'}; training stopped. {last_path} holds "
                        "the last finished epoch; lower --lr or check the data.")
            precision.step(loss, optimizer, unused)
            if ema is not None:
                ema.update_parameters(model)
            seen += len(labels)
            loss_sum += loss.detach().double() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            if (step + 1) % check_every == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        seen_all, loss_all, correct_all = dist.sum(torch.tensor(seen, device=device), loss_sum, correct)
        seen, loss_sum, correct = int(seen_all.item()), loss_all.item(), int(correct_all.item())
        if scheduler is not None:
            scheduler.step()

        # --- validate and select (rank 0; the others wait at the barrier) -----------------------
        if dist.is_main:
            val = validate(kept, val_set, val_configs, settings.eval_batch_size)
            if is_pta(kept):
                kept.set_config(settings.select_config)
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / max(1, seen),
                "train_accuracy": correct / max(1, seen),
                "epoch_time_s": train_time,
                "val_time_s": time.perf_counter() - t0 - train_time,
                "images_per_s": seen / train_time if train_time > 0 else float("nan"),
                "lr": lr,
                "val": val,
            }
            if sampler:
                record["config_counts"] = sampler.counts
            history.append(record)
            acer = val[select_key]["acer"]
            key = selection_key(val[select_key])
            improved = not math.isnan(acer) and key < best_key
            if improved:
                best_epoch, best_key = epoch, key
                save_checkpoint(best_path, kept, preprocess.to_dict(), meta={**meta, "epoch": epoch, "val": val})

            # --- save: last.pt before the history line, so a kill between the two loses nothing ---
            train_state = {"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                           "best_epoch": best_epoch, "best_key": list(best_key)}
            if scheduler is not None:
                train_state["scheduler"] = scheduler.state_dict()
            if ema is not None:
                train_state["ema"] = ema.state_dict()
            if precision.scaler.is_enabled():
                train_state["scaler"] = precision.scaler.state_dict()
            save_checkpoint(last_path, model, preprocess.to_dict(), meta={**meta, "epoch": epoch, "val": val},
                            train_state=train_state)
            append_json_line(history_path, record)
            epochs.set_postfix({f"val ACER {select_key}": f"{100 * acer:.2f}%"})
            log(f"epoch {epoch}/{settings.epochs}: loss {record['train_loss']:.4f}, {record['images_per_s']:.0f} img/s, "
                f"val ACER {select_key} {100 * acer:.2f}%{' (best)' if improved else ''}")
        dist.barrier()

    # --- the end: the best model gets per-configuration BatchNorm statistics (rank 0) -------------
    if dist.is_main:
        if not best_path.exists():  # every epoch had an undefined ACER (e.g. a one-class validation set)
            save_checkpoint(best_path, kept, preprocess.to_dict(),
                            meta={**meta, "epoch": settings.epochs, "val": history[-1]["val"] if history else {}})
        best = load_checkpoint(best_path)
        if is_pta(best.model) and settings.bn_configs and settings.bn_images > 0:
            recalibrate_and_save(best, best_path, data["train"], settings.bn_configs, settings.bn_images,
                                 settings.bn_augment, settings.seed, progress, log, zoom=settings.zoom, device=device)
    dist.barrier()
    best = load_checkpoint(best_path)
    if not dist.is_main:  # the run's history is rank 0's
        history = [json.loads(line) for line in history_path.read_text().splitlines()]
    return TrainResult(run, best_path, best.meta.get("epoch", best_epoch), best.meta.get("val", {}), history)
