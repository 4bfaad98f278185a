"""Self-describing checkpoints: one file rebuilds its model alone, and loading it never runs code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``. It carries the architecture, the active configuration, the
per-configuration BatchNorm statistics, the preprocessing, the label map and the versions that
wrote it; a training checkpoint also carries what ``--resume`` needs. Writes go to a temporary
file that is renamed over the target, so a kill never leaves a half-written checkpoint.
"""

from __future__ import annotations

import pickle
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ptanet
from ptanet.atomic import atomic_write
from ptanet.configs import parse_config
from ptanet.models import MobileNetV2, create_model, held_config, is_pta
from ptanet.preprocess import Preprocess

FORMAT = "ptanet.checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode) and what was saved with it."""

    path: Path
    model: MobileNetV2
    preprocess: dict
    labels: dict[int, str]
    config: str | None
    meta: dict = field(default_factory=dict)
    train_state: dict | None = None
    versions: dict = field(default_factory=dict)


def versions() -> dict[str, str]:
    return {"ptanet": ptanet.__version__, "torch": str(torch.__version__), "python": platform.python_version()}


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def model_payload(model: MobileNetV2, preprocess: dict) -> dict:
    """Everything that rebuilds ``model`` for inference, as weights-only-loadable data."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": dict(model.arch),
        "config": held_config(model),
        "preprocess": dict(preprocess),
        "labels": dict(ptanet.LABELS),
        "versions": versions(),
        "state_dict": model.state_dict(),
        "bn_stats": {},
    }
    if is_pta(model):
        payload["bn_stats"] = {
            cfg: {name: {"mean": m, "var": v} for name, (m, v) in stats.items()} for cfg, stats in model.bn_stats().items()
        }
    return payload


def save_checkpoint(path: str | Path, model: MobileNetV2, preprocess: dict, meta: dict | None = None, train_state: dict | None = None) -> Path:
    """Write a checkpoint atomically. ``meta`` holds facts for people (epoch, metrics, settings);
    ``train_state`` what ``--resume`` needs (optimizer, RNG states, ...)."""
    payload = model_payload(model, preprocess)
    payload["meta"] = dict(meta or {})
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_torch_save(payload, path)
    return Path(path)


def _rebuild(arch: dict, path: Path) -> MobileNetV2:
    kwargs = {k: v for k, v in arch.items() if k not in ("name", "config", "average_folded")}
    try:
        model = create_model(arch["name"], **kwargs)
        if "config" in arch and is_pta(model):
            # A static (exported) model: the PTA model reduced to one configuration's branches.
            model = model.to_static(parse_config(arch["config"], model.num_pta_blocks),
                                    fold_average=bool(arch.get("average_folded")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot rebuild the architecture {arch!r}: {exc}") from None
    return model


def _load_error(path: Path, exc: Exception) -> ValueError:
    """One line for a file torch cannot load. A refused pickle is named as what it is (code, which a
    checkpoint never holds) with the global it wanted. Torch's own text advises switching the guard
    off (``weights_only=False``), which is never the answer for a checkpoint, so none of it is kept
    but the reason itself."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(exc, pickle.UnpicklingError) and found:
        return ValueError(f"{path}: refused: the file holds code (a reference to {found.group(1)}), and a ptanet "
                          "checkpoint is plain data only; it was not loaded and nothing in it ran")
    advice = ("weights_only", "weights only", "trust", "file an issue", "documentation", "error:")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if not any(a in line.lower() for a in advice)), type(exc).__name__)
    return ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {reason.split('. ')[0][:200]})")


def _checked_payload(payload: Any, path: Path) -> dict:
    """The fields `load_checkpoint` relies on, checked so that a damaged or hand-made file is refused
    in one line naming it instead of failing later with a KeyError."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a ptanet checkpoint (expected a dict with format={FORMAT!r})")
    version = payload.get("format_version", 0)
    if not isinstance(version, int):
        raise ValueError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version} is newer than this ptanet reads "
                         f"({FORMAT_VERSION}); upgrade ptanet")
    for key, kind in (("arch", dict), ("state_dict", dict), ("preprocess", dict), ("labels", dict)):
        if not isinstance(payload.get(key), kind):
            found = "missing" if key not in payload else f"a {type(payload[key]).__name__}"
            raise ValueError(f"{path}: damaged ptanet checkpoint: {key!r} must be a {kind.__name__}, found {found}")
    if "name" not in payload["arch"]:
        raise ValueError(f"{path}: damaged ptanet checkpoint: the architecture {payload['arch']!r} has no name")
    try:
        labels = {int(k): v for k, v in payload["labels"].items()}
    except (TypeError, ValueError):
        labels = {}
    if sorted(labels) != [0, 1] or not all(isinstance(v, str) and v for v in labels.values()):
        raise ValueError(f"{path}: damaged ptanet checkpoint: the label map must name classes 0 and 1, "
                         f"got {payload['labels']!r}")
    try:
        Preprocess.from_dict(payload["preprocess"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(payload.get("bn_stats", {}), dict) or not isinstance(payload.get("meta", {}), dict):
        raise ValueError(f"{path}: damaged ptanet checkpoint: 'bn_stats' and 'meta' must be dicts")
    return {**payload, "labels": labels}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and rebuild a checkpoint written by :func:`save_checkpoint` (weights only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise _load_error(path, exc) from None
    payload = _checked_payload(payload, path)
    model = _rebuild(payload["arch"], path)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the architecture {payload['arch']}: {str(exc)[:300]}") from None
    try:
        if is_pta(model):
            for cfg, stats in payload.get("bn_stats", {}).items():
                model.set_bn_stats(cfg, {name: (s["mean"], s["var"]) for name, s in stats.items()})
            if payload.get("config"):
                model.set_config(payload["config"])
        elif payload.get("config") and parse_config(payload["config"]) != held_config(model):
            raise ValueError(f"configuration {payload['config']!r} is not the one the model holds "
                             f"({held_config(model) or 'No PTA'})")
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{path}: damaged ptanet checkpoint: invalid stored configuration or BatchNorm "
                         f"statistics: {exc}") from None
    model.eval()
    return Checkpoint(
        path=path,
        model=model,
        preprocess=payload["preprocess"],
        labels=payload["labels"],
        config=payload.get("config"),
        meta=payload.get("meta", {}),
        train_state=payload.get("train_state"),
        versions=payload.get("versions", {}),
    )
