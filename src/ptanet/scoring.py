"""Prediction on crop datasets, and the one per-configuration loop that training's validation and
evaluation (paper Table 3) both use."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ptanet.configs import BASELINE_LABEL
from ptanet.data import CropDataset
from ptanet.metrics import compute_metrics
from ptanet.models import CHANNELS_LAST, MobileNetV2, is_pta, to_fast_layout

VAL_METRICS = ("accuracy", "apcer", "bpcer", "acer", "auc", "eer")


# --- prediction ------------------------------------------------------------------------------------
@torch.inference_mode()
def predict(model: MobileNetV2, dataset: CropDataset, batch_size: int = 128) -> tuple[np.ndarray, float]:
    """Spoof scores (softmax probability of class 1) for every item, and the mean cross-entropy;
    computed on the model's device (fp32), with pinned memory and non-blocking copies on CUDA."""
    to_fast_layout(model).eval()
    device = next(model.parameters()).device
    scores, loss_sum = [], 0.0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda"):
        images = images.to(device, non_blocking=True).contiguous(memory_format=CHANNELS_LAST)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels.to(device), reduction="sum").item()
        scores.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0), loss_sum / max(1, len(dataset))


def score_configs(model: MobileNetV2, dataset: CropDataset, configs: Iterable[str],
                  batch_size: int = 128) -> dict[str | None, tuple[np.ndarray, float]]:
    """``predict`` for each configuration of a PTA model (key None: a model without configurations).
    The one per-configuration loop: training's validation and evaluation both use it."""
    out = {}
    for config in list(configs) if is_pta(model) else [None]:
        if config is not None:
            model.set_config(config)
        out[config] = predict(model, dataset, batch_size)
    return out


def validate(model: MobileNetV2, dataset: CropDataset, configs: list[str], batch_size: int = 128) -> dict[str, dict]:
    """Validation metrics per configuration (threshold 0.5); key ``"No PTA"`` for the baseline."""
    out = {}
    for config, (scores, loss) in score_configs(model, dataset, configs, batch_size).items():
        m = compute_metrics(scores, dataset.labels, threshold=0.5)
        out[config or BASELINE_LABEL] = {k: m[k] for k in VAL_METRICS} | {"loss": loss}
    return out


