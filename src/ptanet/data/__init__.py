"""Data for training and evaluation: item lists (CelebA-Spoof layout or a live/spoof folder), the
face-crop cache, the torch datasets over it, training augmentations and the embedded synthetic set.

Typical use: `build_datasets(root, cache_root)` -> {"train", "val", "test": CropCache, ...}, then
`CropDataset(cache, preprocess, augment=True)` in a DataLoader. The crop rule and normalisation
themselves are part of the library core (`ptanet.preprocess`), shared with deployment.
"""

from ptanet.data.augment import make_train_augment
from ptanet.data.cache import CropCache, PrepareReport, prepare_cache
from ptanet.data.celeba import (SPOOF_TYPES, Item, LoadResult, Skipped, describe_split, load_celeba, load_folder,
                                split_train_val)
from ptanet.data.dataset import CropDataset, bench_loader, build_datasets, load_items, prepare_split

__all__ = [
    "SPOOF_TYPES", "CropCache", "CropDataset", "Item", "LoadResult", "PrepareReport", "Skipped", "bench_loader",
    "build_datasets", "describe_split", "load_celeba", "load_folder", "load_items", "make_train_augment",
    "prepare_cache", "prepare_split", "split_train_val",
]
