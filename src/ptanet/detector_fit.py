"""Fit and measure a face detector's box correction on a data set with known boxes (``ptanet fit-detector``).

On the training images of a CelebA-layout set, each image's dataset box (the box the training crops
were cut with) is paired with the largest face the detector finds, and a `BoxCorrection` is fitted by
least squares. On the test images it measures, with the correction applied: the box IoU with the
dataset box (also without the correction, for comparison), how often no face is found, and, given a
model, the share of images whose decision with the detector's crop equals the decision with the
dataset box. The result is one entry of ``ptanet/detectors.json``.

This is the experiment side (it reads data sets with ``ptanet.data``); the core only reads the JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ptanet.atomic import write_json_atomic
from ptanet.data.celeba import load_celeba
from ptanet.detect import CORRECTIONS_FILE, BoxCorrection, FaceDetector, stored_corrections
from ptanet.liveness import _iou, load_image
from ptanet.preprocess import Preprocess

PACKAGE_JSON = Path(__file__).resolve().parent / CORRECTIONS_FILE


def _pairs(items, detector: FaceDetector, what: str) -> tuple[list, list, list, int]:
    """(images, dataset boxes, raw detector boxes) for the items where a face is found; count without."""
    geometry = Preprocess()  # boxes only: box_scale does not enter the box itself
    images, targets, found, missed = [], [], [], 0
    for item in tqdm(items, desc=f"{detector.kind} on {what}", leave=False):
        rgb, _ = load_image(item.path)
        faces = detector.faces(rgb)
        if not faces:
            missed += 1
            continue
        images.append(rgb)
        targets.append(geometry.box_to_pixels(item.box224, rgb.shape[1], rgb.shape[0]))
        found.append(faces[0].raw_box)
    return images, targets, found, missed


def fit_detector(data: str | os.PathLike, detect: str, model: str | os.PathLike | None = None,
                 protocol: str = "intra_test") -> dict:
    """Fit the correction of detector spec ``detect`` on ``data``'s train split and measure it on its
    test split (decisions too, with checkpoint or ONNX ``model``). Returns the JSON entry."""
    detector = FaceDetector(detect, correct=False)
    train = [i for i in load_celeba(data, "train", protocol).items if i.box224 is not None]
    test = [i for i in load_celeba(data, "test", protocol).items if i.box224 is not None]
    if not train or not test:
        raise ValueError(f"{data}: need train and test images with box files to fit a detector correction")
    _, targets, found, missed_train = _pairs(train, detector, "train")
    if not found:
        raise ValueError(f"{data}: {detector.kind} found no face in any training image")
    correction = BoxCorrection.fit(np.array(found), np.array(targets))
    images, targets, found, missed_test = _pairs(test, detector, "test")
    corrected = [correction.apply(b) for b in found]
    measured = {
        "images": len(test), "no_face": missed_test,
        "mean_iou": float(np.mean([_iou(c, t) for c, t in zip(corrected, targets)])) if found else None,
        "mean_iou_uncorrected": float(np.mean([_iou(b, t) for b, t in zip(found, targets)])) if found else None,
    }
    if model is not None:
        from ptanet.infer import Predictor

        predictor = Predictor(model, box_files=False)
        prep = predictor.preprocess
        with_box = predictor.score_crops([prep.crop(im, box_px=t) for im, t in zip(images, targets)]) if images else []
        with_det = predictor.score_crops([prep.crop(im, box_px=c) for im, c in zip(images, corrected)]) if images else []
        same = int(np.sum((np.asarray(with_box) >= predictor.threshold) == (np.asarray(with_det) >= predictor.threshold)))
        # An image without a detected face has no decision: it counts as a disagreement.
        margin = np.abs(np.asarray(with_box) - predictor.threshold)
        measured.update({"model": Path(model).name, "config": predictor.config, "threshold": predictor.threshold,
                         "same_decision": same / len(test),
                         # How crowded the scores are at the threshold: there, any crop change flips decisions.
                         "near_threshold": {str(m): float(np.mean(margin < m)) for m in (0.01, 0.05)} if images else None,
                         "mean_abs_score_change": float(np.mean(np.abs(np.asarray(with_box) - np.asarray(with_det))))
                         if images else None})
    return {"correction": correction.to_dict(),
            "fitted_on": {"data": Path(data).name, "split": "train", "images": len(train), "no_face": missed_train},
            "test": measured}


def store_correction(kind: str, entry: dict, path: str | os.PathLike | None = None) -> Path:
    """Write ``entry`` for detector ``kind`` into the corrections file (default: the package's own),
    keeping the other detectors' entries; atomic."""
    path = Path(path) if path is not None else PACKAGE_JSON
    current = json.loads(path.read_text()) if path.is_file() else (stored_corrections() if path == PACKAGE_JSON else {})
    current[kind] = entry
    return write_json_atomic(path, dict(sorted(current.items())), indent=2)
