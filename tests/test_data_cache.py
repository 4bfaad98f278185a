"""Face-crop cache: pixel-exact round trip, skips, reuse, invalidation, resume, datasets, loaders."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ptanet.data import (CropCache, CropDataset, bench_loader, build_datasets, load_celeba, load_folder, prepare_cache,
                         split_train_val)
from ptanet.preprocess import Preprocess, Reason, read_image_rgb

SMALL = Preprocess(size=32)


def direct_crop(item, preprocess: Preprocess) -> np.ndarray:
    return preprocess.crop(read_image_rgb(item.path), box224=item.box224)


def assert_cache_matches(cache: CropCache, items, preprocess: Preprocess) -> None:
    assert cache.rels == [item.rel for item in items]
    assert cache.labels.tolist() == [item.label for item in items] and cache.labels.dtype == np.int64
    assert cache.subjects == [item.subject for item in items]
    for row, item in enumerate(items):
        np.testing.assert_array_equal(cache.crops[row], direct_crop(item, preprocess))


@pytest.fixture
def tiny_items(tiny_celeba):
    for n in range(20):
        tiny_celeba.add(subject=str(n % 4), label=n % 2, box="20 30 150 120 0.9", size=(80 + n, 60))
    return load_celeba(tiny_celeba.write_labels(), "train").items


def test_round_trip_is_pixel_exact(tiny_items, tmp_path):
    report = prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False)
    assert (report.n_cached, report.n_processed, report.skipped, report.complete) == (20, 20, [], True)
    assert "cached 20 items (10 live, 10 spoof); skipped 0" in report.summary()
    assert "images/s" in report.summary() and "MB on disk" in report.summary()
    cache = CropCache(tmp_path / "c")
    assert cache.crops.shape == (20, 32, 32, 3) and cache.crops.dtype == np.uint8
    assert not cache.crops.flags.writeable and cache.preprocess == SMALL
    assert_cache_matches(cache, tiny_items, SMALL)


def test_nuaa_subset_round_trip_with_worker_processes(nuaa_dev, tmp_path):
    items = load_celeba(nuaa_dev, "train").items[::56][:40]
    report = prepare_cache(items, tmp_path / "nuaa", Preprocess(), workers=2, progress=False, chunk_size=8)
    assert report.n_cached == 40 and report.bytes_on_disk >= 40 * 128 * 128 * 3
    assert_cache_matches(CropCache(tmp_path / "nuaa"), items, Preprocess())


def test_bad_images_in_the_middle_are_skipped_and_every_index_works(tiny_items, tmp_path):
    Path(tiny_items[5].path).write_bytes(b"garbage, not a jpeg")
    os.remove(tiny_items[9].path)
    tiny = Preprocess(size=32, box_frame=100000)  # box scales to < 1 px -> zero size at crop time
    items = tiny_items[:12]
    report = prepare_cache(items, tmp_path / "c", SMALL, workers=2, progress=False, chunk_size=3)
    assert {s.rel: s.reason for s in report.skipped} == {
        items[5].rel: Reason.IMAGE_UNREADABLE, items[9].rel: Reason.IMAGE_MISSING}
    assert items[5].path in report.skipped[0].detail
    assert "skipped 2: 1 image unreadable, 1 image file missing" in report.summary()
    good = [item for i, item in enumerate(items) if i not in (5, 9)]
    cache = CropCache(tmp_path / "c")
    assert len(cache) == 10
    assert_cache_matches(cache, good, SMALL)
    dataset = CropDataset(cache, SMALL, augment=True)
    labels = [dataset[i][1] for i in range(len(dataset))]  # every index of the filtered result
    assert labels == [item.label for item in good]
    zero = prepare_cache(items[:2], tmp_path / "z", tiny, workers=0, progress=False)
    assert [s.reason for s in zero.skipped] == [Reason.BOX_ZERO] * 2 and len(CropCache(tmp_path / "z")) == 0


def test_reused_when_unchanged_rebuilt_when_sources_or_settings_change(tiny_items, tmp_path):
    first = prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False)
    again = prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False)
    assert again.reused and again.n_processed == 0 and again.n_cached == first.n_cached
    assert "reused" in again.summary()
    stat = os.stat(tiny_items[3].path)
    os.utime(tiny_items[3].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "touch"
    touched = prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False)
    assert not touched.reused and touched.n_processed == 20
    bigger = Preprocess(size=48)
    resized = prepare_cache(tiny_items, tmp_path / "c", bigger, workers=0, progress=False)
    assert resized.n_processed == 20 and CropCache(tmp_path / "c").crops.shape == (20, 48, 48, 3)
    fewer = prepare_cache(tiny_items[:7], tmp_path / "c", bigger, workers=0, progress=False)
    assert fewer.n_processed == 7 and len(CropCache(tmp_path / "c")) == 7


def test_resumes_after_an_interruption(tiny_items, tmp_path):
    Path(tiny_items[2].path).write_bytes(b"corrupt")  # a skip before the interruption must survive it
    partial = prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False, chunk_size=4,
                            _stop_after_chunks=2)
    assert not partial.complete and partial.n_processed == 8 and "INCOMPLETE: 8/20" in partial.summary()
    with pytest.raises(ValueError, match="incomplete.*8/20.*resume"):
        CropCache(tmp_path / "c")
    rest = prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=2, progress=False, chunk_size=4)
    assert rest.complete and rest.resumed_from == 8 and rest.n_processed == 12
    assert [s.reason for s in rest.skipped] == [Reason.IMAGE_UNREADABLE]
    assert_cache_matches(CropCache(tmp_path / "c"), tiny_items[:2] + tiny_items[3:], SMALL)


def test_unusable_progress_restarts_from_scratch(tiny_items, tmp_path):
    prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False, chunk_size=4,
                  _stop_after_chunks=1)
    (tmp_path / "c" / "progress.json").write_text("{truncated")
    report = prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False)
    assert report.resumed_from == 0 and report.n_processed == 20
    assert_cache_matches(CropCache(tmp_path / "c"), tiny_items, SMALL)


def test_resumes_after_kill_9(tiny_items, tmp_path):
    """A real interruption: a child process preparing slowly is killed with SIGKILL mid-way."""
    cache_dir = tmp_path / "c"
    script = f"""
import time, pickle, ptanet.data.cache as c
c.FLUSH_EVERY_S = 0
slow = c._Cropper.__call__
c._Cropper.__call__ = lambda self, tasks: (time.sleep(0.3), slow(self, tasks))[1]
items = pickle.loads({pickle.dumps(tiny_items)!r})
c.prepare_cache(items, {str(cache_dir)!r}, c.Preprocess(size=32), workers=0, progress=False, chunk_size=2)
"""
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            progress = (json.loads((cache_dir / "progress.json").read_text())
                        if (cache_dir / "progress.json").exists() else {})
            if progress.get("n_done", 0) >= 4:
                break
            assert child.poll() is None, "child ended before it could be interrupted"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    report = prepare_cache(tiny_items, cache_dir, SMALL, workers=0, progress=False)
    assert report.complete and 4 <= report.resumed_from < 20
    assert report.n_processed == 20 - report.resumed_from
    assert_cache_matches(CropCache(cache_dir), tiny_items, SMALL)


def test_crop_cache_errors(tmp_path, tiny_items):
    with pytest.raises(FileNotFoundError, match="not a crop cache"):
        CropCache(tmp_path / "nothing")
    prepare_cache(tiny_items[:3], tmp_path / "c", SMALL, workers=0, progress=False)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps({**meta, "format": 999}))
    with pytest.raises(ValueError, match="format 999"):
        CropCache(tmp_path / "c")
    with pytest.raises(ValueError, match="no items"):
        prepare_cache([], tmp_path / "e", SMALL)
    prepare_cache(tiny_items[:3], tmp_path / "d", SMALL, workers=0, progress=False)
    with pytest.raises(IndexError, match="rows out of range"):
        CropCache(tmp_path / "d", rows=[0, 3])
    whole, read_again = CropCache(tmp_path / "d"), CropCache(tmp_path / "d", rows=[2, 0])
    part = whole.part([2, 0])
    assert part.rels == read_again.rels == [whole.rels[2], whole.rels[0]] and len(whole) == 3
    np.testing.assert_array_equal(part.crops[0], whole.crops[2])
    with pytest.raises(ValueError, match="already a part"):
        part.part([0])
    # Crops cut with another box enlargement are not what the model was trained on.
    with pytest.raises(ValueError, match="box_scale 1.0.*1.5"):
        CropDataset(CropCache(tmp_path / "d"), Preprocess(size=32, box_scale=1.5))


def test_dataset_items_augmentation_and_pickling(tiny_items, tmp_path):
    prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False)
    cache = CropCache(tmp_path / "c")
    plain = CropDataset(cache, SMALL, augment=False, indices=[3, 0])
    x, y = plain[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == tiny_items[3].label
    torch.testing.assert_close(x, SMALL.normalize(np.array(cache.crops[3])))
    assert plain.labels.tolist() == [tiny_items[3].label, tiny_items[0].label]

    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state()
    a, b = CropDataset(cache, SMALL, augment=True, seed=5), CropDataset(cache, SMALL, augment=True, seed=5)
    first = torch.stack([a[i][0] for i in range(len(a))])
    torch.testing.assert_close(first, torch.stack([b[i][0] for i in range(len(b))]))  # seeded
    assert not torch.equal(first, torch.stack([plain.preprocess.normalize(np.array(c)) for c in cache.crops]))
    a.set_epoch(1)
    assert not torch.equal(first, torch.stack([a[i][0] for i in range(len(a))]))  # epochs differ
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)

    assert len(pickle.dumps(a)) < 10_000  # the cache travels as its path, not its crops
    assert len(pickle.loads(pickle.dumps(a))) == 20
    loader = DataLoader(a, batch_size=8, num_workers=2)
    batches = list(loader)
    assert sum(len(labels) for _, labels in batches) == 20 and batches[0][0].shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="32px.*size is 128"):
        CropDataset(cache, Preprocess(), augment=False)


def test_bench_loader_reports_speed(tiny_items, tmp_path):
    prepare_cache(tiny_items, tmp_path / "c", SMALL, workers=0, progress=False)
    (row,) = bench_loader(CropCache(tmp_path / "c"), SMALL, batch_size=4, workers_list=(0,), batches=3,
                          warmup=1)
    assert row["workers"] == 0 and row["images"] == 12 and row["images_per_s"] > 0


def test_build_datasets_celeba(tiny_celeba, tmp_path):
    for n in range(12):
        tiny_celeba.add(subject=str(n % 6), label=n % 2)
    for n in range(4):
        tiny_celeba.add(split="test", subject="t", label=n % 2)
    root = tiny_celeba.write_labels()
    out = build_datasets(root, tmp_path / "cache", SMALL, workers=0, progress=False)
    assert len(out["train"]) + len(out["val"]) == 12 and len(out["test"]) == 4
    assert not set(out["train"].subjects) & set(out["val"].subjects)
    assert out["split"].startswith("train: ") and set(out["reports"]) == {"train", "test"}
    again = build_datasets(root, tmp_path / "cache", SMALL, workers=0, progress=False)
    assert all(r.reused for r in again["reports"].values())
    # Another validation rule or seed splits the same cached train list: nothing is decoded again.
    items = {item.rel: item for item in load_celeba(root, "train").items}
    for val_split, seed in (("random", 0), ("random", 1), ("subject", 1)):
        other = build_datasets(root, tmp_path / "cache", SMALL, val_split=val_split, seed=seed, workers=0, progress=False)
        assert all(r.reused for r in other["reports"].values())
        train, val = split_train_val(list(items.values()), 0.2, by=val_split, seed=seed)
        for part, expected in (("train", train), ("val", val)):  # each part: its items, in their order
            assert_cache_matches(other[part], expected, SMALL)
            assert other[part].spoof_types.tolist() == [item.spoof_type for item in expected]
            assert pickle.loads(pickle.dumps(other[part])).rels == other[part].rels


def test_build_datasets_folder_with_train_and_test(tmp_path, write_image):
    root = tmp_path / "own"
    for part, n in (("train", 6), ("test", 2)):
        for i in range(n):
            write_image(root / part / ("live", "spoof")[i % 2] / f"s{i % 3}" / f"{i}.png", seed=i)
    out = build_datasets(root, tmp_path / "cache", SMALL, source="folder", workers=0, progress=False)
    assert len(out["train"]) + len(out["val"]) == 6 and len(out["test"]) == 2
    only_train = root / "train"
    out = build_datasets(only_train, tmp_path / "cache2", SMALL, source="folder", workers=0, progress=False)
    assert "test" not in out and len(out["train"]) + len(out["val"]) == 6


def test_folder_with_haar_detector(nuaa_dev, tmp_path):
    root = tmp_path / "faces"
    (root / "live").mkdir(parents=True)
    for name in ("000001.jpg", "000004.jpg"):
        (root / "live" / name).write_bytes((nuaa_dev / "Data/train/1/live" / name).read_bytes())
    (root / "spoof").mkdir()
    cv2.imwrite(str(root / "spoof" / "blank.png"), np.full((120, 120, 3), 90, np.uint8))  # no face
    result = load_folder(root, detect="haar")
    report = prepare_cache(result.items, tmp_path / "c", Preprocess(), workers=0, detect=result.detect,
                           progress=False)
    assert report.n_cached == 2 and [(s.rel, s.reason) for s in report.skipped] == [
        ("spoof/blank.png", Reason.NO_FACE)]
    whole = Preprocess().crop(read_image_rgb(root / "live" / "000001.jpg"))
    assert not np.array_equal(CropCache(tmp_path / "c").crops[0], whole)  # a face box, not the image
