"""Prediction on image files: live or spoof, with the crop and normalisation the model was trained on.

A ``Predictor`` runs either a ptanet checkpoint (PyTorch; a PTA model switches configuration in place
with :meth:`Predictor.set_config`) or an ``.onnx`` file from ``ptanet.export`` (onnxruntime; the
preprocessing and labels come from the file's metadata, so the two give the same scores).

The face box of an image is chosen as the training data pipeline chooses it, so that inference sees
the crops the model learned from: an explicit ``box224``; else a CelebA-Spoof ``<stem>_BB.txt`` beside
the image; else, with ``detect``, the largest face a detector finds; else the whole image.

Per-image problems (unreadable file, bad box file, no face) become rows with an ``error`` instead of
exceptions, so one bad file in a folder of thousands does not stop the rest.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ptanet.checkpoint import load_checkpoint
from ptanet.configs import parse_config
from ptanet.detect import make_detector
from ptanet.export import SpoofScorer
from ptanet.models import held_config, is_pta
from ptanet.preprocess import (IMAGE_EXTENSIONS, EmptyBoxError, ImageReadError, NoFaceError, Preprocess, box_file_of,
                               choose_box, parse_box_file, read_image_rgb)
from ptanet.runtime import DeployedModel, is_exported
from ptanet.threshold import DEFAULT_THRESHOLD, check_threshold, threshold_for


class _TorchBackend:
    """A checkpoint run with PyTorch. Switching a PTA configuration swaps branch pointers only."""

    def __init__(self, path: Path, config: str | None) -> None:
        ck = load_checkpoint(path)
        self.path, self.model, self.preprocess, self.labels = path, ck.model, ck.preprocess, ck.labels
        self.scorer = SpoofScorer(self.model).eval()
        self.meta = ck.meta
        self.stored = ck.meta.get("threshold")
        check_threshold(self.stored, str(path))
        if config is not None:
            self.set_config(config)

    @property
    def config(self) -> str | None:
        return held_config(self.model)

    def set_config(self, config: str) -> None:
        if is_pta(self.model):
            self.model.set_config(config)
        elif parse_config(config) != self.config:
            what = f"holds configuration {self.config} only" if self.config else "is the No PTA baseline"
            raise ValueError(f"{self.path}: cannot use configuration {config!r}: the model {what}")

    @torch.inference_mode()
    def scores(self, crops: np.ndarray) -> np.ndarray:
        return self.scorer(Preprocess.from_dict(self.preprocess).normalize(crops))[1].numpy()


class _OnnxBackend:
    """An exported file run with onnxruntime (``ptanet.runtime.DeployedModel``): a static file holds
    one configuration, a switchable one several, switched without reloading."""

    def __init__(self, path: Path, config: str | None, threads: int) -> None:
        self.path = path
        self.model = DeployedModel(path, threads)
        self.preprocess, self.labels = self.model.meta["preprocess"], self.model.meta["labels"]
        try:
            Preprocess.from_dict(self.preprocess)
        except (TypeError, ValueError) as exc:  # metadata from a newer ptanet or edited by hand
            raise ValueError(f"{path}: {exc}") from None
        self.stored = self.model.meta.get("threshold")
        check_threshold(self.stored, str(path))
        if config is not None:
            self.set_config(config)

    @property
    def config(self) -> str | None:
        return self.model.config

    def set_config(self, config: str) -> None:
        self.model.set_config(config)

    def scores(self, crops: np.ndarray) -> np.ndarray:
        return self.model.spoof_scores(crops)  # uint8 RGB crops: the graph normalises them itself


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), by the extensions the data readers accept."""
    folder = Path(folder)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return images


class Predictor:
    """Live/spoof predictions for images, from a checkpoint (``.pt``) or an exported ``.onnx``.

    ``config``: the PTA configuration to run (default: the one stored with the model); a static
    ONNX file holds one configuration and accepts only that one, a switchable one (``ptanet export``'s
    default ``model_switchable.onnx``) those it was exported with. ``detect``: None, ``"haar"`` or
    ``"yunet:/path/model.onnx"``, used for images without a box file. ``box_files=False`` ignores
    ``<stem>_BB.txt`` files. ``threads``: onnxruntime threads (ONNX only; PyTorch keeps its own
    setting, which is process-wide). An image is labelled spoof iff its score >= ``threshold``, as in
    ``ptanet.metrics``; ``threshold=None`` takes the one stored with the model for the active
    configuration (``ptanet calibrate``, or per configuration from cross-validation; see
    ``ptanet.threshold``), else 0.5. ``threshold_source`` says which: "given", "stored" or "default";
    both follow :meth:`set_config`.
    """

    def __init__(self, model_path: str | os.PathLike, config: str | None = None, detect: str | None = None,
                 threshold: float | None = None, box_files: bool = True, threads: int = 1) -> None:
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
                                          and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a number in [0, 1] (scores are probabilities), got {threshold!r}")
        path = Path(model_path)
        if is_exported(path):
            self._backend: _TorchBackend | _OnnxBackend = _OnnxBackend(path, config, threads)
        else:
            self._backend = _TorchBackend(path, config)
        self.model_path = path
        self.preprocess = Preprocess.from_dict(self._backend.preprocess)
        self.labels: dict[int, str] = self._backend.labels
        self._given = None if threshold is None else float(threshold)
        self.detect = detect
        self.box_files = box_files
        self._detector = make_detector(detect) if detect is not None else None

    @property
    def backend(self) -> str:
        """"onnxruntime" or "torch"."""
        return "onnxruntime" if isinstance(self._backend, _OnnxBackend) else "torch"

    @property
    def config(self) -> str | None:
        """The active PTA configuration; None for the No PTA baseline."""
        return self._backend.config

    @property
    def threshold(self) -> float:
        """The spoof threshold in use for the active configuration."""
        return self._threshold()[0]

    @property
    def threshold_source(self) -> str:
        """"given", "stored" or "default" (see the class docstring)."""
        return self._threshold()[1]

    def _threshold(self) -> tuple[float, str]:
        if self._given is not None:
            return self._given, "given"
        stored = threshold_for(self._backend.stored, self.config, str(self.model_path))
        return (stored, "stored") if stored is not None else (DEFAULT_THRESHOLD, "default")

    def set_config(self, config: str) -> "Predictor":
        """Switch the PTA configuration (checkpoints: in place, no copy). Returns ``self``."""
        self._backend.set_config(config)
        return self

    # --- one image: box and crop ----------------------------------------------------------------
    def _row(self, path: str | None) -> dict:
        return {"path": path, "score": None, "label": None, "box_px": None, "box_source": None,
                "config": self.config, "error": None}

    def _crop(self, image: str | os.PathLike | np.ndarray,
              box224: tuple[float, float, float, float] | None) -> tuple[dict, np.ndarray | None]:
        """The result row (without score) and the face crop; on a per-image problem the row's
        ``error`` says what and the crop is None."""
        is_array = isinstance(image, np.ndarray)
        name = "<array>" if is_array else os.fspath(image)
        row = self._row(None if is_array else name)
        try:
            rgb = image if is_array else read_image_rgb(image)
            given = "given" if box224 is not None else None
            if box224 is None and self.box_files and not is_array and os.path.exists(box_file_of(name)):
                box224, reason, detail = parse_box_file(box_file_of(name))
                if box224 is None:
                    row["error"] = f"{name}: {reason} ({detail})"
                    return row, None
                given = "file"
            box_px, source = choose_box(self.preprocess, rgb, box224, self._detector)
            source = given or source
            crop = self.preprocess.crop(rgb, box_px=box_px)
            if box_px is None:
                box_px = (0, 0, rgb.shape[1], rgb.shape[0])
        except NoFaceError:
            row["error"] = f"{name}: no face detected ({self.detect})"
            return row, None
        except (ImageReadError, EmptyBoxError) as exc:
            row["error"] = str(exc) if isinstance(exc, ImageReadError) else f"{name}: {exc}"
            return row, None
        row["box_px"], row["box_source"] = tuple(int(v) for v in box_px), source
        return row, crop

    def score_crops(self, crops: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Spoof scores of face crops already cut by ``self.preprocess.crop`` (uint8, N x size x size x 3)."""
        return self._backend.scores(np.stack(list(crops)))  # uint8: each backend normalises as its model does

    def _score(self, rows: list[dict], crops: list[np.ndarray]) -> None:
        if not crops:
            return
        scores = self.score_crops(crops)
        threshold = self.threshold  # of the active configuration, looked up once per batch
        for row, score in zip(rows, scores):
            # In float64: numpy would compare a float32 score with the threshold rounded to float32, and
            # a calibrated threshold just above a score would then equal it.
            row["score"] = float(score)
            row["label"] = self.labels[1] if row["score"] >= threshold else self.labels[0]

    # --- public API -----------------------------------------------------------------------------
    def predict_image(self, image: str | os.PathLike | np.ndarray,
                      box224: tuple[float, float, float, float] | None = None) -> dict:
        """Predict one image: a file path, or an RGB uint8 HxWx3 array (as ``read_image_rgb`` gives).

        Returns ``{path, score, label ('live'|'spoof'), box_px, box_source, config, error}``; when
        ``error`` is set (unreadable image, bad box file, no face), score and label are None.
        """
        row, crop = self._crop(image, box224)
        if crop is not None:
            self._score([row], [crop])
        return row

    def iter_paths(self, paths: str | os.PathLike | Iterable[str | os.PathLike],
                   batch_size: int = 32) -> Iterator[dict]:
        """Like :meth:`predict_paths`, yielding rows as each batch finishes (for long folders)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        # Folders expand to the images under them, wherever they stand in the list.
        paths = [p for item in paths for p in (list_images(item) if Path(item).is_dir() else [item])]
        batch: list[str | os.PathLike] = []
        for path in [*paths, None]:
            if path is not None:
                batch.append(path)
                if len(batch) < batch_size:
                    continue
            prepared = [self._crop(p, None) for p in batch]
            ok = [(row, crop) for row, crop in prepared if crop is not None]
            self._score([r for r, _ in ok], [c for _, c in ok])
            yield from (row for row, _ in prepared)
            batch = []

    def predict_paths(self, paths: str | os.PathLike | Iterable[str | os.PathLike],
                      batch_size: int = 32) -> list[dict]:
        """Predict image files, or every image under a folder (recursive, sorted), in batches.

        One row per image in input order (see :meth:`predict_image`); a problem with one image gives
        that row an ``error`` naming the file and the rest go on.
        """
        return list(self.iter_paths(paths, batch_size))
