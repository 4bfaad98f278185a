"""Data: item lists (CelebA-Spoof layout or a live/spoof folder), the face crop and normalisation
stored with every model, training augmentations, and the face-crop cache that training reads.

Typical use: `build_datasets(root, cache_root)` -> {"train", "val", "test": CropCache, ...}, then
`CropDataset(cache, preprocess, augment=True)` in a DataLoader.
"""

from ptanet.data.augment import make_train_augment
from ptanet.data.cache import (CropCache, CropDataset, PrepareReport, bench_loader, build_datasets,
                               prepare_cache)
from ptanet.data.celeba import (SPOOF_TYPES, Item, LoadResult, Reason, Skipped, describe_split,
                                load_celeba, load_folder, split_train_val)
from ptanet.data.detect import make_detector
from ptanet.data.preprocess import EmptyBoxError, ImageReadError, Preprocess, read_image_rgb

__all__ = [
    "SPOOF_TYPES", "CropCache", "CropDataset", "EmptyBoxError", "ImageReadError", "Item", "LoadResult",
    "PrepareReport", "Preprocess", "Reason", "Skipped", "bench_loader", "build_datasets",
    "describe_split", "load_celeba", "load_folder", "make_detector", "make_train_augment",
    "prepare_cache", "read_image_rgb", "split_train_val",
]
