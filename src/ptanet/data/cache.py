"""Face-crop cache (the format: its writer `prepare_cache` and its reader `CropCache`): every image is
decoded, cropped and resized once, then training reads raw crops (`ptanet.data.dataset`).

Decoding a JPEG and cropping it costs far more than a training step's share of the loader budget on
CPU, and 20 epochs over CelebA-Spoof would decode each image 20 times. `prepare_cache` does it once, in
parallel worker processes, into one uint8 array `crops.npy` (N, size, size, 3) that `CropCache` maps
read-only, so DataLoader workers share the pages instead of copying them.

Files in a cache folder:
- `crops.npy`    uint8 (N_items, size, size, 3), written through a memmap; the first `n_cached` rows are
                 the good crops, in item order (rows of skipped items are not written, so nothing needs
                 compacting; the unused tail stays sparse).
- `index.json`   per good row: rel, label, spoof_type, subject (columns), written when complete.
- `meta.json`    format version, preprocess settings, detector, fingerprint of the sources, completion.
- `progress.json` how many items are done and which were skipped (why), replaced atomically.

Resuming: results are written in item order, so what is done is always a prefix of the item list.
`progress.json` is rewritten (temp file + os.replace) only after the crop rows it covers were flushed, so
after a kill -9 the next call restarts at the first item not recorded, never trusting unflushed rows.
A change of any source file (size, mtime), box, label, item list, preprocess setting or detector
changes the fingerprint and rebuilds the cache from scratch.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
from tqdm import tqdm

from ptanet.atomic import write_json_atomic
from ptanet.data.celeba import Item, Skipped, count_summary
from ptanet.detect import correction_for, make_detector, parse_detect_spec
from ptanet import preprocess as _preprocess
from ptanet.preprocess import (EmptyBoxError, ImageReadError, ImageTooLargeError, NoFaceError, Preprocess, Reason,
                               choose_box, read_image_rgb)
from ptanet.data.workers import pool_context

FORMAT_VERSION = 1
CROPS, INDEX, META, PROGRESS = "crops.npy", "index.json", "meta.json", "progress.json"
FLUSH_EVERY_S = 2.0  # how much finished work a kill -9 may cost at most (plus one chunk)


# --- small file helpers --------------------------------------------------------------------------
def _read_json(path: Path) -> Any | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def bytes_on_disk(folder: str | os.PathLike) -> int:
    """Allocated bytes of the files in a folder (sparse files count only what is written)."""
    total = 0
    for entry in os.scandir(folder):
        if entry.is_file():
            st = entry.stat()
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def source_fingerprint(items: list[Item], preprocess: Preprocess, detect: str | None) -> str:
    """Hash of everything a cache's content depends on: each item's path, label, subject and box, its
    file's size and mtime (a replaced image changes them), the preprocess settings and the detector with
    its box correction (a refitted correction moves every detected crop)."""
    settings = {"format": FORMAT_VERSION, "preprocess": preprocess.to_dict(), "detect": detect}
    if detect:  # only then: caches cropped with box files keep their fingerprint
        settings["correction"] = correction_for(parse_detect_spec(detect)[0]).to_dict()
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for item in items:
        try:
            st = os.stat(item.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{item.path}\0{item.rel}\0{item.label}\0{item.spoof_type}\0{item.subject}\0"
                 f"{item.box224}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


# --- the work done per image (in worker processes) -------------------------------------------------
@functools.lru_cache(maxsize=None)
def _detector(spec: str):
    """One detector per process and spec (OpenCV detectors cannot be pickled to workers)."""
    return make_detector(spec)


def _init_worker() -> None:
    # Each worker is one process on one core; OpenCV's own thread pool would only oversubscribe.
    cv2.setNumThreads(1)


@dataclass(frozen=True)
class _Cropper:
    """Crops a chunk of (path, box224) tasks -> [(crop | None, skip reason, detail)]. Picklable."""

    preprocess: Preprocess
    detect: str | None
    # Read in the parent when the cropper is made: worker processes do not see a changed module value.
    max_pixels: int = field(default_factory=lambda: _preprocess.MAX_PIXELS)

    def __call__(self, tasks: list[tuple[str, tuple[float, float, float, float] | None]]
                 ) -> list[tuple[np.ndarray | None, str, str]]:
        return [self._one(path, box224) for path, box224 in tasks]

    def _one(self, path: str, box224) -> tuple[np.ndarray | None, str, str]:
        if not os.path.exists(path):
            return None, Reason.IMAGE_MISSING, path
        try:
            image = read_image_rgb(path, self.max_pixels)
        except ImageTooLargeError as exc:
            return None, Reason.IMAGE_TOO_LARGE, str(exc)
        except ImageReadError as exc:
            return None, Reason.IMAGE_UNREADABLE, str(exc)
        try:
            box_px, _ = choose_box(self.preprocess, image, box224, _detector(self.detect) if self.detect else None)
            return self.preprocess.crop(image, box_px=box_px), "", ""
        except NoFaceError:
            return None, Reason.NO_FACE, f"{path} ({self.detect})"
        except EmptyBoxError as exc:
            return None, Reason.BOX_ZERO, f"{path}: {exc}"


# --- prepare ---------------------------------------------------------------------------------------
@dataclass
class PrepareReport:
    """What `prepare_cache` did: items cached and skipped (with reasons), time, speed, size."""

    cache_dir: str
    n_items: int
    n_cached: int
    skipped: list[Skipped]
    seconds: float
    n_processed: int  # items decoded in this call (0 when the cache was reused)
    workers: int
    bytes_on_disk: int
    reused: bool = False
    resumed_from: int = 0  # items already done by an earlier, interrupted call
    complete: bool = True
    labels: Counter = field(default_factory=Counter)

    @property
    def images_per_s(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        head = count_summary(self.n_cached, self.labels, self.skipped, verb="cached")
        if self.reused:
            how = "reused (sources and settings unchanged)"
        else:
            how = (f"{self.n_processed} images in {self.seconds:.1f} s ({self.images_per_s:.0f} images/s, "
                   f"{self.workers} workers)")
            if self.resumed_from:
                how += f", resumed after {self.resumed_from} done earlier"
            if not self.complete:
                how += f"; INCOMPLETE: {self.resumed_from + self.n_processed}/{self.n_items} done"
        return f"{self.cache_dir}: {head}; {how}; {self.bytes_on_disk / 1e6:.1f} MB on disk"

    __str__ = summary


def _clear(cache_dir: Path) -> None:
    for name in (META, PROGRESS, INDEX, CROPS):  # meta first: a half-cleared folder is never "valid"
        (cache_dir / name).unlink(missing_ok=True)


def _skipped_from(progress: dict, items: list[Item]) -> dict[int, Skipped]:
    return {i: Skipped(items[i].rel, reason, detail) for i, reason, detail in progress["skipped"]}


def prepare_cache(items: list[Item], cache_dir: str | os.PathLike, preprocess: Preprocess = Preprocess(),
                  workers: int = 2, detect: str | None = None, progress: bool = True, *,
                  chunk_size: int = 64, _stop_after_chunks: int | None = None) -> PrepareReport:
    """Crop and resize every item once into `cache_dir` (see the module doc for the format).

    Reuses a complete cache whose fingerprint matches, resumes an interrupted one, rebuilds otherwise.
    `workers` processes decode in parallel (0 = in this process). With `detect`, items without a box get
    the largest face the detector finds (none found: skipped). Unreadable images are skipped and
    reported. `_stop_after_chunks` is a test hook that stops early as an interruption would.

    Workers start with forkserver (spawn on Windows), so a script calling this with workers > 0 needs
    the usual `if __name__ == "__main__":` guard; the `ptanet` command and `python -m ptanet` have it.
    """
    if not items:
        raise ValueError(f"{cache_dir}: no items to cache")
    if detect is not None:
        parse_detect_spec(detect)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    n_items, size = len(items), preprocess.size
    fingerprint = source_fingerprint(items, preprocess, detect)
    meta = _read_json(cache_dir / META)
    state = _read_json(cache_dir / PROGRESS)
    same = (isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION
            and meta.get("fingerprint") == fingerprint and (cache_dir / CROPS).is_file())

    def report(n_processed: int, resumed_from: int, reused: bool, complete: bool,
               skipped: list[Skipped], n_cached: int) -> PrepareReport:
        skipped_rels = {s.rel for s in skipped}
        labels = Counter(i.label for i in items[:resumed_from + n_processed] if i.rel not in skipped_rels)
        return PrepareReport(str(cache_dir), n_items, n_cached, skipped, time.perf_counter() - started,
                             n_processed, workers, bytes_on_disk(cache_dir), reused, resumed_from,
                             complete, labels)

    if same and meta.get("complete") and (cache_dir / INDEX).is_file():
        skipped = [Skipped(**s) for s in meta["skipped"]]
        return report(0, n_items, True, True, skipped, meta["n_cached"])

    crops = None
    if same and isinstance(state, dict):
        try:
            skipped_at = _skipped_from(state, items)
            n_done, n_written = int(state["n_done"]), int(state["n_written"])
            shape = np.load(cache_dir / CROPS, mmap_mode="r").shape
            if (shape == (n_items, size, size, 3) and 0 <= n_done <= n_items
                    and n_done - len(skipped_at) == n_written):
                crops = np.lib.format.open_memmap(cache_dir / CROPS, mode="r+")
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass
    if crops is None:  # new, changed or unusable: start from scratch
        _clear(cache_dir)
        crops = np.lib.format.open_memmap(cache_dir / CROPS, mode="w+", dtype=np.uint8,
                                          shape=(n_items, size, size, 3))
        skipped_at, n_done, n_written = {}, 0, 0
        write_json_atomic(cache_dir / PROGRESS, {"n_done": 0, "n_written": 0, "skipped": []})
        write_json_atomic(cache_dir / META, {
            "format": FORMAT_VERSION, "fingerprint": fingerprint, "preprocess": preprocess.to_dict(),
            "detect": detect, "n_items": n_items, "complete": False})
    resumed_from = n_done

    def flush() -> None:
        crops.flush()  # rows reach the file before progress claims them
        write_json_atomic(cache_dir / PROGRESS, {
            "n_done": n_done, "n_written": n_written,
            "skipped": [[i, s.reason, s.detail] for i, s in sorted(skipped_at.items())]})

    starts = list(range(n_done, n_items, chunk_size))
    tasks = ([(it.path, it.box224) for it in items[s:s + chunk_size]] for s in starts)
    cropper = _Cropper(preprocess, detect)
    pool = pool_context(__name__).Pool(workers, initializer=_init_worker) if workers > 0 else None
    stopped = False
    last_flush = time.monotonic()
    try:
        results: Iterable = pool.imap(cropper, tasks) if pool else map(cropper, tasks)
        with tqdm(total=n_items, initial=n_done, disable=not progress, unit="img",
                  desc=f"crops {cache_dir.name}") as bar:
            for n_chunks, (start, result) in enumerate(zip(starts, results), 1):
                row = n_written
                chunk_skips = {}
                for offset, (crop, reason, detail) in enumerate(result):
                    if crop is None:
                        chunk_skips[start + offset] = Skipped(items[start + offset].rel, reason, detail)
                    else:
                        crops[row] = crop
                        row += 1
                # commit the whole chunk at once, so an interruption never leaves a half-counted chunk
                skipped_at.update(chunk_skips)
                n_done, n_written = start + len(result), row
                bar.update(len(result))
                if _stop_after_chunks is not None and n_chunks >= _stop_after_chunks:
                    stopped = n_done < n_items
                    break
                if time.monotonic() - last_flush >= FLUSH_EVERY_S:
                    flush()
                    last_flush = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        flush()  # also on KeyboardInterrupt: what was committed is kept for the next call
    del crops

    skipped = [s for _, s in sorted(skipped_at.items())]
    if stopped:
        return report(n_done - resumed_from, resumed_from, False, False, skipped, n_written)
    good = [item for i, item in enumerate(items) if i not in skipped_at]
    write_json_atomic(cache_dir / INDEX, {
        "rel": [i.rel for i in good], "label": [i.label for i in good],
        "spoof_type": [i.spoof_type for i in good], "subject": [i.subject for i in good]})
    meta = _read_json(cache_dir / META)
    meta.update(complete=True, n_cached=n_written,
                skipped=[{"rel": s.rel, "reason": s.reason, "detail": s.detail} for s in skipped])
    write_json_atomic(cache_dir / META, meta)
    return report(n_done - resumed_from, resumed_from, False, True, skipped, n_written)


# --- reading ---------------------------------------------------------------------------------------
class _Rows:
    """Some rows of a read-only crop array, picked by index without copying them (fancy indexing a
    memmap would read every picked crop into memory at once)."""

    def __init__(self, base: np.ndarray, rows: np.ndarray) -> None:
        self.base, self.rows = base, rows
        self.shape, self.dtype = (len(rows), *base.shape[1:]), base.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.base[self.rows[i]]


class CropCache:
    """A finished cache, opened read-only: `crops` (N, size, size, 3) uint8 memmap, `labels` and
    `spoof_types` (int64), `subjects`, `rels`, and the `preprocess` it was built with.

    With `rows`, only those rows of the folder, in that order (the train or validation part of one
    cached train list): every attribute then describes the part, and `crops` reads through to the map.

    Pickles as its folder path and rows (DataLoader workers started with spawn reopen the memmap
    instead of receiving a copy of every crop).
    """

    def __init__(self, cache_dir: str | os.PathLike, rows: Iterable[int] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / META
        meta = _read_json(meta_path)
        if meta is None:
            raise FileNotFoundError(f"{meta_path}: not a crop cache (missing or unreadable meta.json); "
                                    "build it with prepare_cache / build_datasets")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: cache format {meta.get('format')!r}, this ptanet reads "
                             f"format {FORMAT_VERSION}; delete {self.cache_dir} and prepare it again")
        if not meta.get("complete"):
            done = (_read_json(self.cache_dir / PROGRESS) or {}).get("n_done", 0)
            raise ValueError(f"{self.cache_dir}: crop cache is incomplete ({done}/{meta.get('n_items')} "
                             "items); run prepare_cache again to resume it")
        index = _read_json(self.cache_dir / INDEX)
        if index is None:
            raise ValueError(f"{self.cache_dir / INDEX}: missing or unreadable; prepare the cache again")
        self.meta = meta
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self.crops: np.ndarray = np.load(self.cache_dir / CROPS, mmap_mode="r")[:meta["n_cached"]]
        self.rels: list[str] = index["rel"]
        self.labels = np.asarray(index["label"], dtype=np.int64)
        self.spoof_types = np.asarray(index["spoof_type"], dtype=np.int64)
        self.subjects: list[str] = index["subject"]
        if not len(self.crops) == len(self.rels) == len(self.labels) == len(self.subjects):
            raise ValueError(f"{self.cache_dir}: crops.npy and index.json disagree in length; "
                             "delete the folder and prepare it again")
        self.rows = None
        if rows is not None:
            self._select(rows)

    def _select(self, rows: Iterable[int]) -> None:
        self.rows = np.asarray(list(rows), dtype=np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(self.crops)):
            raise IndexError(f"{self.cache_dir}: rows out of range for its {len(self.crops)} crops")
        self.crops = _Rows(self.crops, self.rows)
        self.labels, self.spoof_types = self.labels[self.rows], self.spoof_types[self.rows]
        self.rels = [self.rels[r] for r in self.rows]
        self.subjects = [self.subjects[r] for r in self.rows]

    def part(self, rows: Iterable[int]) -> "CropCache":
        """The same as `CropCache(self.cache_dir, rows)` for a whole cache, without reading its files again."""
        if self.rows is not None:
            raise ValueError(f"{self!r} is already a part; take parts of the whole cache")
        view = copy.copy(self)
        view._select(rows)
        return view

    def __len__(self) -> int:
        return len(self.crops)

    def __repr__(self) -> str:
        part = "" if self.rows is None else ", part"
        return f"CropCache({str(self.cache_dir)!r}, n={len(self)}{part}, size={self.preprocess.size})"

    def __getstate__(self) -> dict:
        return {"cache_dir": str(self.cache_dir), "rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache_dir"], state.get("rows"))
