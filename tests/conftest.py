"""Shared data fixtures: the real nuaa-dev set from ../shared, and tiny generated CelebA-layout sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


@pytest.fixture(scope="session")
def nuaa_dev() -> Path:
    """Root of /shared/data/nuaa-dev; skipped when absent, except under CI where it must exist."""
    root = (SHARED / "data" / "nuaa-dev").resolve()
    if not (root / "metas").is_dir():
        message = f"{root} is absent: the shared folder (../shared from the repo root) is not here"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI always provides it")
        pytest.skip(message)
    return root


def _write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """A random-noise image (JPEG or PNG by suffix); content differs per seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels), path
    return path


class TinyCeleba:
    """Builds a small CelebA-Spoof-layout set: `add(...)` images, then `write_labels()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.labels: dict[str, dict[str, list[int]]] = {"train": {}, "test": {}}
        self._next = 1

    def add(self, split: str = "train", subject: str = "1", label: int = 0, box: str | None = "50 50 124 124 0.9",
            image: bool = True, size: tuple[int, int] = (64, 48), spoof_type: int | None = None) -> str:
        """Add one image (+ box file unless box is None) and its label entry; returns its rel key."""
        n = self._next
        self._next += 1
        rel = f"Data/{split}/{subject}/{'spoof' if label else 'live'}/{n:06d}.jpg"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if image:
            _write_image(path, *size, seed=n)
        if box is not None:
            (path.parent / f"{n:06d}_BB.txt").write_text(box)
        vector = [0] * 44
        vector[40] = (1 if label else 0) if spoof_type is None else spoof_type
        vector[43] = label
        self.labels[split][rel] = vector
        return rel

    def write_labels(self, protocol: str = "intra_test") -> Path:
        folder = self.root / "metas" / protocol
        folder.mkdir(parents=True, exist_ok=True)
        for split, labels in self.labels.items():
            (folder / f"{split}_label.json").write_text(json.dumps(labels))
        return self.root


@pytest.fixture
def tiny_celeba(tmp_path: Path) -> TinyCeleba:
    return TinyCeleba(tmp_path / "celeba")


@pytest.fixture
def write_image():
    """`write_image(path, width=64, height=48, seed=0)` -> path of a random-noise JPEG/PNG."""
    return _write_image


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A tiny synthetic CelebA-layout set (3 train subjects, 1 test subject, 8 images each)."""
    from ptanet.data.synth import write_synth

    root = tmp_path_factory.mktemp("synth") / "data"
    write_synth(root, n_subjects_train=3, n_subjects_test=1, images_per_subject=8, size=96, workers=1)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core machine: a second intra-op thread only adds contention
    (several times slower under load), so tests that ask for this run PyTorch single-threaded."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model(tiny_synth, tmp_path_factory) -> Path:
    """A PTA checkpoint trained for one epoch on `tiny_synth` at 32x32 (small and quick, never downloaded);
    per-configuration BatchNorm statistics for LLL and BBB."""
    import torch

    from ptanet.train.loop import train
    from ptanet.train.settings import resolve_settings

    out = tmp_path_factory.mktemp("tiny_model")
    settings = resolve_settings(data=str(tiny_synth), out=str(out / "run"), cache=str(out / "cache"), size=32,
                                batch_size=4, epochs=1, val_configs=["HHH"], bn_configs=["LLL", "BBB"], bn_images=8,
                                prepare_workers=0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(settings, progress=False, log=lambda *_: None).best_checkpoint
    finally:
        torch.set_num_threads(previous)
