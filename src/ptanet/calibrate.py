"""Threshold calibration on the user's own camera (``ptanet calibrate``), stored with the model.

A model's scores shift with the camera, the light and the detector, so the 0.5 of the training data
rarely fits. ``calibrate`` scores a labelled folder (images under folders named ``live`` and ``spoof``,
at any depth), picks the
threshold for a target and writes it into the model file as ``{value, rule, data, n}``: a checkpoint's
``meta["threshold"]``, an ONNX file's ``threshold`` metadata. ``Predictor`` and ``LivenessChecker``
then use it whenever no threshold is given.

Rules (spoof is the positive class, spoof iff score >= threshold, as in ``ptanet.metrics``):
``apcer=X``: the highest threshold whose APCER (attacks accepted) is at most X, which gives the lowest
BPCER under that bound; ``bpcer=X``: the lowest threshold whose BPCER (live rejected) is at most X;
``eer``: the threshold at the equal error rate (``metrics.eer_point``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ptanet.atomic import atomic_write
from ptanet.checkpoint import atomic_torch_save
from ptanet.infer import Predictor, list_images
from ptanet.runtime import ARTIFACT_MANIFEST, is_exported, read_artifact
from ptanet.metrics import _candidate_thresholds, _error_counts_at, eer_point, error_rates


def parse_target(target: str) -> tuple[str, float | None]:
    """"apcer=0.05" -> ("apcer", 0.05); "eer" -> ("eer", None); anything else: ValueError."""
    name, _, value = target.strip().lower().partition("=")
    if name == "eer" and not value:
        return "eer", None
    if name in ("apcer", "bpcer"):
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if 0.0 <= rate <= 1.0:
            return name, rate
    raise ValueError(f"bad calibration target {target!r}; use apcer=RATE, bpcer=RATE (RATE in [0, 1]) or eer")


def pick_threshold(scores: np.ndarray, labels: np.ndarray, target: str) -> float:
    """The threshold for ``target`` (see the module docstring) on spoof scores with labels 0 live, 1 spoof."""
    rule, rate = parse_target(target)
    s, spoof = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if spoof.all() or not spoof.any():
        raise ValueError("calibration needs both live and spoof images")
    if rule == "eer":
        return eer_point(s, spoof.astype(int))[1]
    thresholds = _candidate_thresholds(s)
    fp, fn = _error_counts_at(s, spoof, thresholds)  # live rejected, attacks accepted
    if rule == "apcer":
        ok = np.flatnonzero(fn <= rate * spoof.sum())
        return float(thresholds[ok[-1]])  # fn grows with the threshold; the lowest always qualifies
    ok = np.flatnonzero(fp <= rate * (~spoof).sum())
    return float(thresholds[ok[0]])  # fp falls with the threshold; above the maximum it is 0


def _labelled(folder: Path) -> tuple[list[Path], list[int]]:
    """Images under ``folder`` labelled by the nearest parent folder named live or spoof (so both
    ``ROOT/live/...`` and CelebA's ``ROOT/Data/test/<subject>/live/...`` work); others are ignored."""
    paths, labels = [], []
    for path in list_images(folder):
        names = [p.name.lower() for p in path.relative_to(folder).parents]
        label = next((0 if n == "live" else 1 for n in names if n in ("live", "spoof")), None)
        if label is not None:
            paths.append(path)
            labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(f"{folder}: calibration needs images in folders named live and spoof (e.g. "
                         f"{folder}/live, {folder}/spoof), found {labels.count(0)} live and {labels.count(1)} spoof")
    return paths, labels


def store_threshold(model: str | os.PathLike, threshold: dict, out: str | os.PathLike | None = None) -> Path:
    """Write the model with ``threshold`` stored, atomically, to ``out`` or over ``model``."""
    src, dst = Path(model), Path(out) if out is not None else Path(model)
    if is_exported(src):
        import onnx

        def with_threshold(graph: Path, external: bool) -> bytes:
            proto = onnx.load(os.fspath(graph), load_external_data=external)
            props = {p.key: p.value for p in proto.metadata_props}
            props["threshold"] = json.dumps(threshold)
            onnx.helper.set_model_props(proto, props)
            return proto.SerializeToString()

        if src.is_dir() or src.name == ARTIFACT_MANIFEST:  # a switchable folder: every graph, in place
            folder = src if src.is_dir() else src.parent
            if out is not None and Path(out).resolve() != folder.resolve():
                raise ValueError(f"{src}: a switchable folder takes its threshold in place; copy the folder "
                                 "first and calibrate the copy instead of giving --out")
            for _, graph in read_artifact(folder):
                data = with_threshold(graph, external=False)  # the weights file stays as it is
                atomic_write(graph, lambda f, data=data: f.write(data), binary=True)
            return folder
        # A file whose weights sit beside it (a switchable file) keeps reading them where it is;
        # written elsewhere, it takes its weights inside.
        same_place = dst.resolve().parent == src.resolve().parent
        data = with_threshold(src, external=not same_place)
        return atomic_write(dst, lambda f: f.write(data), binary=True)
    payload = torch.load(src, map_location="cpu", weights_only=True)
    payload.setdefault("meta", {})["threshold"] = threshold
    atomic_torch_save(payload, dst)
    return dst


def calibrate(model: str | os.PathLike, data: str | os.PathLike, target: str, out: str | os.PathLike | None = None,
              config: str | None = None, detect: str | None = None) -> dict:
    """Score ``data``'s live/ and spoof/ images (box files beside them, else ``detect``, else the whole
    image), pick the threshold for ``target`` and store it with the model. Returns what was stored plus
    the error rates at it and the images that could not be scored."""
    parse_target(target)
    folder = Path(data)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    predictor = Predictor(model, config=config, detect=detect)
    paths, labels = _labelled(folder)
    rows = predictor.predict_paths(paths)
    kept = [(r["score"], y) for r, y in zip(rows, labels) if r["error"] is None]
    if not kept:
        raise ValueError(f"{folder}: no image could be scored")
    scores, ys = np.array([k[0] for k in kept]), np.array([k[1] for k in kept])
    value = pick_threshold(scores, ys, target)
    stored = {"value": value, "rule": target.strip().lower(), "data": os.fspath(folder), "n": int(len(kept)),
              "config": predictor.config}
    written = store_threshold(model, stored, out)
    rates = error_rates(scores, ys, value)
    return {**stored, "model": os.fspath(written), "apcer": rates["apcer"], "bpcer": rates["bpcer"],
            "skipped": [r["error"] for r in rows if r["error"] is not None]}
