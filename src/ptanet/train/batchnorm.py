"""Per-configuration BatchNorm statistics, re-estimated after training (the once-for-all / US-Nets practice).

Training leaves one set of running statistics that mixes all sampled configurations, which fits rarely
(LLL) or never (B) sampled ones badly. For each configuration the statistics of every BatchNorm whose
input depends on the configuration are reset and re-estimated on training crops, and stored in the
model (``PTAMobileNetV2.set_bn_stats``), which swaps them in with the branches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ptanet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ptanet.configs import parse_config
from ptanet.data import CropCache, CropDataset
from ptanet.data.dataset import describe_data
from ptanet.models import CHANNELS_LAST, PTAMobileNetV2, is_pta, to_fast_layout
from ptanet.preprocess import Preprocess
from ptanet.train.settings import load_data, resolve_settings


@torch.no_grad()
def recalibrate_bn(model: PTAMobileNetV2, dataset: CropDataset, configs: Iterable[str], num_images: int = 1000,
                   batch_size: int = 64, seed: int = 0, progress: bool = True,
                   device: torch.device | str | None = None) -> None:
    """Re-estimate, for each configuration, the running statistics of every configuration-dependent
    BatchNorm on ``num_images`` crops of ``dataset`` (augmented or not as the dataset says): reset,
    then a cumulative average in train mode, without gradients. Layers before the first PTA block keep
    their trained statistics. ``device`` (default: the model's) is where the passes run.
    """
    model.clear_bn_stats()
    bns = model.adaptive_bns
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset), size=min(num_images, len(dataset)), replace=False)
    batches = [torch.stack([dataset[int(i)][0] for i in idx[s : s + batch_size]]).contiguous(memory_format=CHANNELS_LAST)
               for s in range(0, len(idx), batch_size)]
    to_fast_layout(model)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
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
                model(images.to(device, non_blocking=True))
            for bn in bns.values():
                bn.eval()
    finally:
        for n, bn in bns.items():
            bn.momentum = saved[n][0]
            bn.num_batches_tracked.copy_(saved[n][1])
        model.set_config(active)
        model.eval()


def recalibrate_and_save(ck: Checkpoint, path: Path, train_cache: CropCache, configs: list[str], num_images: int,
                         augment: bool, seed: int, progress: bool, log, zoom: float = 1.0,
                         device: torch.device | str | None = None) -> None:
    """Recalibrate ``ck``'s model on ``train_cache`` and write it to ``path``, recording how."""
    log(f"re-estimating BatchNorm statistics for {len(configs)} configurations on {num_images} "
        f"{'augmented' if augment else 'plain'} training crops")
    # Augmented crops include the training's zoom: the statistics should describe the mix of views
    # the weights were trained on, as they do for colour and noise.
    crops = CropDataset(train_cache, Preprocess.from_dict(ck.preprocess), augment=augment, hflip=True, seed=seed,
                        zoom=zoom)
    active = ck.model.config
    recalibrate_bn(ck.model, crops, configs, num_images, seed=seed, progress=progress, device=device)
    ck.model.set_config(active)
    ck.model.cpu()  # a checkpoint holds CPU tensors, whatever device computed them
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
    for line in describe_data(data):  # what was read and skipped, as training reports it
        log(line)
    out = Path(out) if out else path
    recalibrate_and_save(ck, out, data["train"], configs, settings.bn_images if num_images is None else num_images,
                         settings.bn_augment if augment is None else augment, settings.seed, progress, log,
                         zoom=settings.zoom)
    return out
