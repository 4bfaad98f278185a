"""Training (the paper's recipe), validation, prediction and per-configuration BatchNorm recalibration.

One training run trains one model. For a PTA model each iteration samples one configuration from
the paper's Table 2 distribution and runs forward/backward through it alone. Every random choice
of an epoch (shuffle order, augmentation, dropout, configuration draws) is seeded from
``(seed, epoch)``, so a run resumed from its last checkpoint ends with the same weights as one
that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm

from ptanet.atomic import write_json_atomic
from ptanet.checkpoint import load_checkpoint, save_checkpoint
from ptanet.data import CropDataset, Preprocess, build_datasets
from ptanet.metrics import compute_metrics, selection_key
from ptanet.models import BASELINE_LABEL, MobileNetV2, PTAMobileNetV2, create_model, is_pta, parse_config, parse_configs

# Paper Table 2: configurations sampled during training and their probabilities (B never trained).
PAPER_SAMPLING: dict[str, float] = {"HHH": 0.45, "LHH": 0.15, "HLH": 0.15, "HHL": 0.15, "LLL": 0.10}
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainSettings:
    """Everything a training run depends on. Defaults are the paper's (Section 4)."""

    data: str = ""  # data root: CelebA-Spoof layout (source=celeba) or live/ + spoof/ folders
    out: str = "runs/train"  # run folder: settings.json, history.jsonl, last.pt, best.pt
    source: str = "celeba"
    protocol: str = "intra_test"
    detect: str | None = None  # face detector for folder data without boxes: "haar" or "yunet:PATH"
    cache: str | None = None  # crop-cache folder (default: <out>/../cache/<data folder name>)
    arch: str = "pta_mobilenet_v2"
    width_mult: float = 1.0
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4  # Adam
    size: int = 128
    # Crop the face box enlarged this many times about its centre (Preprocess.box_scale); 1.0 is the
    # paper's tight box. The setting travels in the checkpoint, so inference and export crop alike.
    box_scale: float = 1.0
    seed: int = 0
    augment: bool = True  # colour jitter + ISO noise
    hflip: bool = False  # also a random horizontal flip (not in the paper)
    affine: bool = False  # also a small random scale/shift/rotation (not in the paper)
    # > 1: half the time, train on a random square window of 1/zoom to all of the crop's side, resized
    # back (not in the paper; see make_train_augment). 1.0 is off.
    zoom: float = 1.0
    # "constant" (the paper's) or "cosine": the learning rate decays from `lr` towards 0 over the
    # epochs, so the last epochs take small steps and the weights settle instead of wandering.
    lr_schedule: str = "constant"
    # None (the paper): validate and keep the trained weights themselves. A decay d in (0, 1): also
    # keep an exponential moving average of the weights (and BatchNorm buffers), updated after every
    # iteration, and validate, select and save that average instead; it smooths the step-to-step
    # wander of a small-batch run. The decay after n updates is min(d, (1 + n) / (10 + n)) (see
    # `_warmed_up_ema`): it reaches 0.995 only after 1,790 updates, so a run of fewer (nuaa-dev's 20
    # epochs are 1,240) averages over roughly its last ninth whatever d is.
    ema_decay: float | None = None
    # None: plain cross-entropy (the paper). "balanced": each class weighted by N / (2 N_class), so
    # the loss, like ACER, counts live and spoof errors alike whatever the class ratio in train.
    class_weights: str | None = None
    # None: every epoch is a shuffle of the training images (the paper). "subject": draw them, with
    # replacement, so that every (subject, class) group is drawn equally often. With few people and
    # unequal counts (nuaa-dev: 41 live against 200 spoof images of one person, 254 against 202 of
    # another) who is in a picture predicts its label; balanced groups take that shortcut away.
    balance: str | None = None
    val_fraction: float = 0.2
    val_split: str = "subject"  # "random" reproduces the paper (it leaks identities into validation)
    sampling: dict[str, float] = field(default_factory=lambda: dict(PAPER_SAMPLING))
    val_configs: list[str] = field(default_factory=lambda: parse_configs("paper"))
    select_config: str = "HHH"  # best epoch = lowest validation ACER of this configuration (Figure 2)
    bn_configs: list[str] = field(default_factory=lambda: parse_configs("paper"))
    bn_images: int = 1000  # training crops used to re-estimate BatchNorm statistics per configuration
    # Re-estimate them on augmented crops (colour jitter, ISO noise and a horizontal flip) instead of
    # plain ones. The weights were trained on the statistics of augmented batches; on nuaa-dev's
    # validation subjects this lowered ACER in every configuration of two differently trained models
    # (README, "Real data: nuaa-dev"). Off by default: the plain crops are the once-for-all practice.
    bn_augment: bool = False
    workers: int = 0  # DataLoader workers; the cache is >10x faster than training, so 0 is enough
    prepare_workers: int = 2
    max_batches: int | None = None  # cap on batches per epoch (quick runs and tests)
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        self.sampling = {parse_config(k): float(v) for k, v in self.sampling.items()}
        if any(v < 0 for v in self.sampling.values()) or sum(self.sampling.values()) <= 0:
            raise ValueError(f"sampling weights must be non-negative with a positive sum, got {self.sampling}")
        for name in ("val_configs", "bn_configs"):
            value = getattr(self, name)
            setattr(self, name, parse_configs(value) if isinstance(value, str) else [parse_config(c) for c in value])
        self.select_config = parse_config(self.select_config)
        if self.class_weights not in (None, "balanced"):
            raise ValueError(f"class_weights must be None or 'balanced', got {self.class_weights!r}")
        if self.balance not in (None, "subject"):
            raise ValueError(f"balance must be None or 'subject', got {self.balance!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        if not self.zoom >= 1.0:
            raise ValueError(f"zoom must be >= 1 (1 is off), got {self.zoom!r}")
        if self.val_split not in ("subject", "random"):
            raise ValueError(f"val_split must be 'subject' or 'random', got {self.val_split!r}")
        for name in ("epochs", "batch_size", "size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.preprocess  # raises on a bad box_scale now, not when the data is first read

    @property
    def is_pta(self) -> bool:
        return self.arch.startswith("pta_")

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.size, box_scale=self.box_scale)

    @property
    def cache_dir(self) -> Path:
        if self.cache:
            return Path(self.cache)
        return Path(self.out).parent / "cache" / Path(self.data).resolve().name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_settings(config_file: str | None = None, **overrides: Any) -> TrainSettings:
    """Settings from the defaults, then an optional YAML file, then explicit overrides (the command
    line); ``None`` overrides mean "not given"."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read settings ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: settings must be a mapping of name: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
    return TrainSettings(**values)


class ConfigSampler:
    """Draws one PTA configuration per iteration from a weighted distribution, with its own
    generator (never the global RNGs that shuffle data or drive dropout)."""

    def __init__(self, weights: dict[str, float], seed: Iterable[int] | int) -> None:
        weights = {parse_config(c): float(w) for c, w in weights.items()}
        self.configs = list(weights)
        p = np.asarray(list(weights.values()), dtype=np.float64)
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)
        self.counts = {c: 0 for c in self.configs}

    def sample(self) -> str:
        config = self.configs[self.rng.choice(len(self.configs), p=self.p)]
        self.counts[config] += 1
        return config


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


class NonFiniteLossError(RuntimeError):
    pass


# channels_last runs MobileNetV2's depthwise convolutions faster on CPU (measured on 2 cores:
# training 35 -> 48 images/s, evaluation 120 -> 180 images/s). It changes memory layout only.
CHANNELS_LAST = torch.channels_last


def _to_fast_layout(model: MobileNetV2) -> MobileNetV2:
    return model.to(memory_format=CHANNELS_LAST)


# --- prediction and validation ---------------------------------------------------------------------
@torch.inference_mode()
def predict(model: MobileNetV2, dataset: CropDataset, batch_size: int = 128) -> tuple[np.ndarray, float]:
    """Spoof scores (softmax probability of class 1) for every item, and the mean cross-entropy."""
    _to_fast_layout(model).eval()
    scores, loss_sum = [], 0.0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = model(images.contiguous(memory_format=CHANNELS_LAST))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        scores.append(torch.softmax(logits, dim=1)[:, 1].numpy())
    return np.concatenate(scores) if scores else np.zeros(0), loss_sum / max(1, len(dataset))


def validate(model: MobileNetV2, dataset: CropDataset, configs: list[str], batch_size: int = 128) -> dict[str, dict]:
    """Validation metrics per configuration (threshold 0.5); key ``"No PTA"`` for the baseline."""
    labels = dataset.labels
    out = {}
    for config in configs if is_pta(model) else [None]:
        if config is not None:
            model.set_config(config)
        scores, loss = predict(model, dataset, batch_size)
        m = compute_metrics(scores, labels, threshold=0.5)
        out[config or BASELINE_LABEL] = {k: m[k] for k in ("accuracy", "apcer", "bpcer", "acer", "auc", "eer")} | {"loss": loss}
    return out


# --- BatchNorm recalibration ---------------------------------------------------------------------
@torch.no_grad()
def recalibrate_bn(model: PTAMobileNetV2, dataset: CropDataset, configs: Iterable[str], num_images: int = 1000,
                   batch_size: int = 64, seed: int = 0, progress: bool = True) -> None:
    """Re-estimate, for each configuration, the running statistics of every BatchNorm whose input
    depends on the configuration, and store them in the model (``set_bn_stats``).

    Training leaves one set of running statistics that mixes all sampled configurations, which
    fits rarely (LLL) or never (B) sampled ones badly. Following once-for-all / US-Nets: reset,
    then a cumulative average over ``num_images`` crops of ``dataset`` (training crops, augmented
    or not as the dataset says) in train mode, without gradients. Layers before the first PTA
    block keep their trained statistics.
    """
    model.clear_bn_stats()
    bns = model.adaptive_bns
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset), size=min(num_images, len(dataset)), replace=False)
    batches = [torch.stack([dataset[int(i)][0] for i in idx[s : s + batch_size]]).contiguous(memory_format=CHANNELS_LAST)
               for s in range(0, len(idx), batch_size)]
    _to_fast_layout(model)
    saved = {n: (bn.momentum, bn.num_batches_tracked.clone()) for n, bn in bns.items()}
    active = model.config
    model.eval()
    try:
        for config in tqdm(list(configs), desc="BN recalibration", disable=not progress, leave=False):
            fresh = {n: (torch.zeros_like(bn.running_mean), torch.ones_like(bn.running_var)) for n, bn in bns.items()}
            model.set_config(config)
            model.set_bn_stats(config, fresh)  # installs the fresh tensors; forward passes fill them
            for bn in bns.values():
                bn.momentum = None  # cumulative moving average over all batches
                bn.num_batches_tracked.zero_()
                bn.train()
            for images in batches:
                model(images)
            for bn in bns.values():
                bn.eval()
    finally:
        for n, bn in bns.items():
            bn.momentum = saved[n][0]
            bn.num_batches_tracked.copy_(saved[n][1])
        model.set_config(active)
        model.eval()


def _recalibrate_and_save(ck, path: Path, train_cache, configs: list[str], num_images: int, augment: bool, seed: int,
                          progress: bool, log, zoom: float = 1.0) -> None:
    log(f"re-estimating BatchNorm statistics for {len(configs)} configurations on {num_images} "
        f"{'augmented' if augment else 'plain'} training crops")
    # Augmented crops include the training's zoom: the statistics should describe the mix of views
    # the weights were trained on (with zoom, half of them magnified), as they do for colour and noise.
    crops = CropDataset(train_cache, Preprocess.from_dict(ck.preprocess), augment=augment, hflip=True, seed=seed,
                        zoom=zoom)
    active = ck.model.config
    recalibrate_bn(ck.model, crops, configs, num_images, seed=seed, progress=progress)
    ck.model.set_config(active)
    meta = {**ck.meta, "bn_recalibration": {"configs": list(configs), "images": num_images, "augment": augment,
                                            "zoom": zoom if augment else 1.0}}
    save_checkpoint(path, ck.model, ck.preprocess, meta=meta)


def recalibrate_checkpoint(path: str | Path, out: str | Path | None = None, configs: Iterable[str] | None = None,
                           num_images: int | None = None, augment: bool | None = None, progress: bool = True,
                           log=print) -> Path:
    """Re-estimate a trained PTA checkpoint's per-configuration BatchNorm statistics (what training
    does at its end) with other settings, e.g. ``augment=True`` for a model trained without
    ``bn_augment``. Uses the training crops of the data the checkpoint was trained on; ``None``
    arguments keep the checkpoint's own settings. Writes ``out`` (default: ``path`` itself,
    atomically); the weights and shared statistics are unchanged.
    """
    path = Path(path)
    ck = load_checkpoint(path)
    if not is_pta(ck.model):
        raise ValueError(f"{path}: a {type(ck.model).__name__} has no configurations to recalibrate")
    settings = resolve_settings(**ck.meta.get("settings", {}))
    if not settings.data:
        raise ValueError(f"{path}: the checkpoint names no training data to recalibrate on")
    configs = settings.bn_configs if configs is None else [parse_config(c) for c in configs]
    if not configs:
        raise ValueError(f"{path}: no configurations to recalibrate")
    data = load_data(settings, progress)
    out = Path(out) if out else path
    _recalibrate_and_save(ck, out, data["train"], configs, settings.bn_images if num_images is None else num_images,
                          settings.bn_augment if augment is None else augment, settings.seed, progress, log,
                          zoom=settings.zoom)
    return out


# --- training --------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


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


def load_data(settings: TrainSettings, progress: bool = True) -> dict[str, Any]:
    """The run's crop caches (train/val[/test]), prepared once and reused."""
    preprocess = settings.preprocess
    return build_datasets(
        settings.data, settings.cache_dir, preprocess, protocol=settings.protocol, val_fraction=settings.val_fraction,
        val_split=settings.val_split, seed=settings.seed, workers=settings.prepare_workers, source=settings.source,
        detect=settings.detect, progress=progress,
    )


def train(settings: TrainSettings, resume: bool = False, progress: bool = True, log=print) -> TrainResult:
    """Train one model with ``settings``; write the run folder; return where the best model is.

    With ``resume`` an interrupted run continues from ``last.pt`` (losing at most the epoch that
    was in progress) and ends with the same weights as an uninterrupted one.
    """
    if not settings.data:
        raise ValueError("no data given: set `data` (a CelebA-Spoof root or a live/spoof folder)")
    run = Path(settings.out)
    last_path, best_path, history_path = run / "last.pt", run / "best.pt", run / "history.jsonl"
    if not resume and last_path.exists():
        raise ValueError(f"{run}: a run already exists there; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / "settings.json", settings.to_dict(), indent=2)

    data = load_data(settings, progress)
    log(data["split"])
    preprocess = settings.preprocess
    train_set = CropDataset(data["train"], preprocess, augment=settings.augment, seed=settings.seed, hflip=settings.hflip,
                            affine=settings.affine, zoom=settings.zoom)
    val_set = CropDataset(data["val"], preprocess, augment=False)

    torch.manual_seed(settings.seed)  # weight initialisation
    model = _to_fast_layout(create_model(settings.arch, width_mult=settings.width_mult))
    if is_pta(model):
        model.clear_bn_stats()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = make_scheduler(optimizer, settings)
    ema = make_ema(model, settings)
    # What is validated and kept as best.pt: the averaged weights when there are some.
    kept = ema.module if ema is not None else model
    loss_weight = balanced_class_weights(data["train"].labels) if settings.class_weights == "balanced" else None
    draw_weights = (group_balanced_weights(data["train"].subjects, data["train"].labels)
                    if settings.balance == "subject" else None)
    history: list[dict] = []
    start_epoch, best_epoch, best_key = 1, 0, (math.inf, math.inf)
    if resume and last_path.exists():
        ck = load_checkpoint(last_path)
        state = ck.train_state or {}
        if ck.meta.get("settings", {}).get("arch") != settings.arch:
            raise ValueError(f"{last_path}: was trained as {ck.meta.get('settings', {}).get('arch')}, not {settings.arch}")
        model.load_state_dict(ck.model.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if (ema is None) != ("ema" not in state):
            raise ValueError(f"{last_path}: this run was trained {'with' if 'ema' in state else 'without'} ema_decay; "
                             "resume it with the same setting")
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history = list(state["history"])
        # Runs started before ties were broken by loss stored only "best_acer".
        best_key = tuple(state["best_key"]) if "best_key" in state else (state["best_acer"], math.inf)
        start_epoch, best_epoch = state["epoch"] + 1, state["best_epoch"]
        log(f"resuming {run} after epoch {state['epoch']}")
    # The checkpoint is the truth: rewrite the history it knows (drops a line from a killed epoch).
    history_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    select_key = settings.select_config if is_pta(model) else BASELINE_LABEL
    val_configs = list(dict.fromkeys([settings.select_config, *settings.val_configs]))
    meta = {"settings": settings.to_dict()}
    epochs = tqdm(range(start_epoch, settings.epochs + 1), desc=f"train {settings.arch}", disable=not progress,
                  initial=start_epoch - 1, total=settings.epochs)
    for epoch in epochs:
        torch.manual_seed(_epoch_seed(settings.seed, epoch, 0))  # dropout
        train_set.set_epoch(epoch)
        order = torch.Generator().manual_seed(_epoch_seed(settings.seed, epoch, 1))
        # As many draws per epoch as images, so epochs stay comparable with the paper's shuffle.
        drawn = (WeightedRandomSampler(draw_weights, len(train_set), replacement=True, generator=order)
                 if draw_weights is not None else None)
        loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=drawn is None, sampler=drawn,
                            drop_last=True, num_workers=settings.workers, generator=None if drawn else order)
        sampler = ConfigSampler(settings.sampling, [settings.seed, epoch, 2]) if is_pta(model) else None
        n_batches = len(loader) if settings.max_batches is None else min(len(loader), settings.max_batches)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, total=n_batches, desc=f"epoch {epoch}", leave=False, disable=not progress)
        for step, (images, labels) in enumerate(bar):
            if step >= n_batches:
                break
            config = sampler.sample() if sampler else None
            if config:
                model.set_config(config)
            logits = model(images.contiguous(memory_format=CHANNELS_LAST))
            loss = F.cross_entropy(logits, labels, weight=loss_weight)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"epoch {epoch}, batch {step + 1}{f' ({config})' if config else ''}: loss is {loss.item()}; "
                    f"training stopped. {last_path} holds the last finished epoch; lower --lr or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        train_time = time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step()
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
        train_state = {"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                       "best_epoch": best_epoch, "best_key": list(best_key)}
        if scheduler is not None:
            train_state["scheduler"] = scheduler.state_dict()
        if ema is not None:
            train_state["ema"] = ema.state_dict()
        # last.pt is written before the history line: a kill between the two loses nothing.
        save_checkpoint(last_path, model, preprocess.to_dict(), meta={**meta, "epoch": epoch, "val": val}, train_state=train_state)
        _append_jsonl(history_path, record)
        epochs.set_postfix({f"val ACER {select_key}": f"{100 * acer:.2f}%"})
        log(f"epoch {epoch}/{settings.epochs}: loss {record['train_loss']:.4f}, {record['images_per_s']:.0f} img/s, "
            f"val ACER {select_key} {100 * acer:.2f}%{' (best)' if improved else ''}")

    if not best_path.exists():  # every epoch had an undefined ACER (e.g. a one-class validation set)
        save_checkpoint(best_path, kept, preprocess.to_dict(), meta={**meta, "epoch": settings.epochs, "val": history[-1]["val"] if history else {}})
    best = load_checkpoint(best_path)
    if is_pta(best.model) and settings.bn_configs and settings.bn_images > 0:
        _recalibrate_and_save(best, best_path, data["train"], settings.bn_configs, settings.bn_images,
                              settings.bn_augment, settings.seed, progress, log, zoom=settings.zoom)
    return TrainResult(run, best_path, best.meta.get("epoch", best_epoch), best.meta.get("val", {}), history)
