"""Torch datasets over the crop cache, and the whole data set of a run (`build_datasets`).

`build_datasets` lists a data root's items, caches each list once (`ptanet.data.cache`) and splits the
train list into train and validation parts by rows of that one cache. `CropDataset` serves normalised
(and optionally augmented) crops of a cache to a DataLoader.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ptanet.data.augment import make_train_augment
from ptanet.data.cache import CropCache, PrepareReport, prepare_cache
from ptanet.data.celeba import LoadResult, describe_parts, load_celeba, load_folder, split_train_val
from ptanet.data.synth.attacks import SPOOF_REPLAY
from ptanet.preprocess import Preprocess

# Synthetic images mixed into training (--mix-synth): the generator's live faces and its screen replays,
# the attack types a print-only real set lacks. The live faces come along so that looking synthetic
# does not by itself predict "spoof". Their names and people are prefixed to stay apart from the real ones.
MIX_SPOOF_TYPES = frozenset(SPOOF_REPLAY)
MIX_PREFIX = "synth:"


class CropDataset(Dataset):
    """(normalised float tensor 3xHxW, int label) per cached crop, optionally augmented.

    Augmentation randomness never touches global generators: each process (the main one, or each
    DataLoader worker) builds its own albumentations Compose on first use, seeded from
    (seed, epoch, worker id). Runs are therefore reproducible for a fixed seed and sampler order, and
    workers do not repeat each other. Call `set_epoch(e)` before each epoch so that epochs differ even
    when DataLoader workers are restarted per epoch (the default, persistent_workers=False).
    """

    def __init__(self, cache: CropCache, preprocess: Preprocess, augment: bool = False, seed: int = 0,
                 indices: Iterable[int] | None = None, hflip: bool = False, affine: bool = False,
                 zoom: float = 1.0, stream: int = 0) -> None:
        if preprocess.size != cache.crops.shape[1]:
            raise ValueError(f"{cache.cache_dir}: crops are {cache.crops.shape[1]}px but preprocess.size "
                             f"is {preprocess.size}; prepare a cache with the same size")
        if (preprocess.box_frame, preprocess.box_scale) != (cache.preprocess.box_frame, cache.preprocess.box_scale):
            raise ValueError(f"{cache.cache_dir}: crops were cut with box_frame {cache.preprocess.box_frame}, "
                             f"box_scale {cache.preprocess.box_scale}, but the model expects {preprocess.box_frame}, "
                             f"{preprocess.box_scale}; prepare a cache with the model's settings")
        self.cache, self.preprocess, self.augment, self.seed = cache, preprocess, augment, seed
        # parts of the augmentation: ignored when augment is False
        self.hflip, self.affine, self.zoom = hflip, affine, zoom
        # Another random stream per torchrun rank (0: a single process's, unchanged).
        self.stream = stream
        self.indices = (np.arange(len(cache)) if indices is None
                        else np.asarray(list(indices), dtype=np.int64))
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(cache)):
            raise IndexError(f"indices out of range for {cache!r}")
        self.labels = cache.labels[self.indices]
        self.epoch = 0
        self._augmenter = None
        self._augmenter_key: tuple | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def _augment_fn(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        key = (os.getpid(), worker, self.epoch)
        if self._augmenter_key != key:
            entropy = [self.seed, self.epoch, worker + 1] + ([self.stream] if self.stream else [])
            seed = np.random.SeedSequence(entropy).generate_state(1)[0]
            self._augmenter, self._augmenter_key = make_train_augment(
                seed=int(seed), hflip=self.hflip, affine=self.affine, zoom=self.zoom, size=self.preprocess.size), key
        return self._augmenter

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[i])
        crop = np.array(self.cache.crops[row])  # copy out of the read-only map
        if self.augment:
            crop = self._augment_fn()(image=crop)["image"]
        return self.preprocess.normalize(crop), int(self.cache.labels[row])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_augmenter"], state["_augmenter_key"] = None, None  # rebuilt per worker
        return state


# --- whole data sets ---------------------------------------------------------------------------------
def build_datasets(root: str | os.PathLike, cache_root: str | os.PathLike,
                   preprocess: Preprocess = Preprocess(), protocol: str = "intra_test",
                   val_fraction: float = 0.2, val_split: str = "subject", seed: int = 0, workers: int = 2,
                   source: str = "celeba", detect: str | None = None,
                   progress: bool = True, holdout_subjects: Iterable[str] = (),
                   mix_root: str | os.PathLike | None = None, mix_fraction: float = 0.0) -> dict[str, Any]:
    """Load the item lists, split train into train/val, and prepare (or reuse) one cache per part.

    source="celeba": `root` in CelebA-Spoof layout; parts train, val (from train) and test.
    source="folder": `root/live`, `root/spoof`; if `root/train` and `root/test` exist instead, each
    holding live/ and spoof/, test comes from `root/test`. Otherwise there is no test part.
    Returns {"train", "val"[, "test"]: CropCache, "split": describe_split text,
    "loaded": {list: LoadResult summary}, "reports": {list: PrepareReport}}; train and val are parts
    of one cache of the whole train list (reports has "train" and "test" only). ``holdout_subjects``
    are kept out of both parts and returned as a third part, "holdout" (a cross-validation fold).

    ``mix_fraction`` > 0 makes that share of the train part synthetic: live and screen-replay images of
    ``mix_root``'s train split (a set written by ``ptanet synth``), drawn with ``seed``; they are cached
    with the train list (in ``train+<mix_root name>``) and never enter val, holdout or test.
    """
    root = Path(root)
    parts = ["train", "test"]
    if source == "folder" and not ((root / "train").is_dir() and (root / "test").is_dir()):
        parts = ["train"]
    loaded = {name: load_items(root, name, source, protocol, detect) for name in parts}
    for name, result in loaded.items():
        if not result.items:
            raise ValueError(f"{root}: no usable {name} items ({result.summary()})")
    out: dict[str, Any] = {"loaded": {k: v.summary() for k, v in loaded.items()}, "reports": {}}
    mix_items = _mix_items(mix_root, out) if mix_fraction > 0 else []
    # The whole train list is cached once and split by rows afterwards: another seed or validation
    # rule then reuses the cache instead of decoding every training image again.
    for name, result in loaded.items():
        extra = mix_items if name == "train" else []
        folder = f"{name}+{Path(mix_root).name}" if extra else name
        report = prepare_cache(result.items + extra, Path(cache_root) / folder, preprocess, workers=workers,
                               detect=detect, progress=progress)
        out["reports"][name] = report
        out[name] = CropCache(report.cache_dir)
    held = set(holdout_subjects)
    unknown = held - {i.subject for i in loaded["train"].items}
    if unknown:
        raise ValueError(f"{root}: holdout subject(s) {sorted(unknown)} are not in the train list")
    kept = [i for i in loaded["train"].items if i.subject not in held]
    train, val = split_train_val(kept, val_fraction, by=val_split, seed=seed)
    parts = {"train": train, "val": val}
    if held:
        parts["holdout"] = [i for i in loaded["train"].items if i.subject in held]
    row_of = {rel: row for row, rel in enumerate(out["train"].rels)}  # skipped items have no row
    # Each part keeps its items' order, so a part reads exactly as a cache of its own list would.
    whole = out["train"]
    rows = {name: [row_of[i.rel] for i in part if i.rel in row_of] for name, part in parts.items()}
    mixed = ""
    if mix_items:
        pool = [row_of[i.rel] for i in mix_items if i.rel in row_of]
        n = round(mix_fraction / (1.0 - mix_fraction) * len(rows["train"]))
        if n > len(pool):
            raise ValueError(f"{mix_root}: a synthetic share of {mix_fraction:g} needs {n} synthetic images, the set "
                             f"has {len(pool)} live and replay training images; write a larger one (ptanet synth "
                             "--train-subjects ...) or lower the share")
        chosen = np.sort(np.random.default_rng([seed, 7]).choice(np.asarray(pool), n, replace=False))
        rows["train"] = rows["train"] + chosen.tolist()
        types = whole.spoof_types[chosen]
        mixed = (f"\nsynthetic mix in train: {n} images of {mix_root} ({int((types == 0).sum())} live, "
                 f"{int((types != 0).sum())} screen replays), {n / max(1, len(rows['train'])):.1%} of the train part")
    for name in parts:
        out[name] = whole.part(rows[name])
    # Counted after unreadable images were dropped: what training really sees.
    out["split"] = describe_parts({name: (out[name].labels.tolist(), out[name].subjects) for name in parts}) + mixed
    return out


def _mix_items(mix_root: str | os.PathLike | None, out: dict[str, Any]) -> list:
    """The live and replay items of a synthetic set's train split, renamed apart from the real ones."""
    if mix_root is None:
        raise ValueError("a synthetic mix needs the synthetic set (synth_data / --synth-data, from ptanet synth)")
    synth = load_items(mix_root, "train", "celeba")
    kept = [dataclasses.replace(i, rel=MIX_PREFIX + i.rel, subject=MIX_PREFIX + i.subject) for i in synth.items
            if i.label == 0 or i.spoof_type in MIX_SPOOF_TYPES]
    if not kept:
        raise ValueError(f"{mix_root}: no live or screen-replay training images ({synth.summary()})")
    out["loaded"]["synthetic train"] = synth.summary()
    return kept


def describe_data(data: dict[str, Any]) -> list[str]:
    """What `build_datasets` read: per list the items kept and skipped (with reasons) in listing and
    in cropping, then the parts as training sees them. Every command that reads a data set prints it."""
    lines = [f"{name} list: {summary}" for name, summary in data["loaded"].items()]
    lines += [f"{name} cache: {report.summary()}" for name, report in data["reports"].items()]
    return lines + data["split"].splitlines()


def load_items(root: str | os.PathLike, split: str, source: str = "celeba", protocol: str = "intra_test",
               detect: str | None = None) -> LoadResult:
    """The items of one split of a data root. celeba: ``metas/<protocol>/<split>_label.json``. folder:
    ``root/<split>/{live,spoof}`` when that folder exists, else ``root/{live,spoof}`` itself."""
    root = Path(root)
    if source == "celeba":
        return load_celeba(root, split, protocol)
    if source == "folder":
        return load_folder(root / split if (root / split).is_dir() else root, detect)
    raise ValueError(f"unknown data source {source!r}; use 'celeba' or 'folder'")


def prepare_split(root: str | os.PathLike, cache_dir: str | os.PathLike, split: str, preprocess: Preprocess = Preprocess(),
                  source: str = "celeba", protocol: str = "intra_test", detect: str | None = None, workers: int = 2,
                  progress: bool = True) -> tuple[CropCache, LoadResult, PrepareReport]:
    """One split of a data root, cached alone in ``cache_dir`` (no train list needed: a test-only set
    from another source measured with a model trained elsewhere)."""
    loaded = load_items(root, split, source, protocol, detect)
    if not loaded.items:
        raise ValueError(f"{root}: no usable {split} items ({loaded.summary()})")
    report = prepare_cache(loaded.items, cache_dir, preprocess, workers=workers, detect=detect, progress=progress)
    return CropCache(report.cache_dir), loaded, report


def bench_loader(cache: CropCache, preprocess: Preprocess, batch_size: int = 32,
                 workers_list: Iterable[int] = (0, 1, 2), batches: int = 50,
                 warmup: int = 5) -> list[dict[str, float]]:
    """Images/s delivered by a DataLoader reading `cache` with augmentation, per worker count.

    The first `warmup` batches (worker start-up, page cache) are not timed. Samples with replacement so
    small caches still give `batches` full batches from one iterator.
    """
    dataset = CropDataset(cache, preprocess, augment=True)
    results = []
    for workers in workers_list:
        sampler = RandomSampler(dataset, replacement=True, num_samples=(warmup + batches) * batch_size,
                                generator=torch.Generator().manual_seed(0))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        n = sum(len(labels) for _, labels in it)
        seconds = time.perf_counter() - t0
        results.append({"workers": workers, "batches": batches, "images": n, "seconds": seconds,
                        "images_per_s": n / seconds})
    return results
