"""Writing the set: the plan of images, labels and boxes, the worker pool, the summary.

``render_image`` draws one frame; ``write_synth`` plans every image of the set, renders them in
worker processes (each from its own RNG, so the bytes do not depend on the worker count) and
writes the CelebA-Spoof layout described in :mod:`ptanet.data.synth`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ptanet.data.synth.attacks import A4, PAD, PC, PHONE, PHOTO, attack
from ptanet.data.synth.faces import camera, draw_face, subject_identity
from ptanet.data.workers import pool_context

FORMAT_VERSION = 1
BOX_FRAME = 224  # CelebA-Spoof *_BB.txt boxes are given in a 224x224 frame
JPEG_QUALITY = 92
SPLITS = ("train", "test")


@dataclass
class SynthSummary:
    """What :func:`write_synth` wrote: counts per split/label, spoof types, time."""

    out_dir: str
    size: int
    seed: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    subjects: dict[str, int] = field(default_factory=dict)
    spoof_types: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 1

    @property
    def n_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_images"] = self.n_images
        return d

    def __str__(self) -> str:
        lines = [f"synthetic CelebA-Spoof-layout set at {self.out_dir}: {self.n_images} images "
                 f"{self.size}x{self.size}, seed {self.seed}, {self.seconds:.1f} s "
                 f"({self.workers} worker{'s' if self.workers != 1 else ''})"]
        for split in SPLITS:
            c = self.counts.get(split, {})
            types = ", ".join(f"type {k}: {v}" for k, v in sorted(
                self.spoof_types.get(split, {}).items(), key=lambda kv: int(kv[0])))
            lines.append(f"  {split:5s}: {self.subjects.get(split, 0):3d} subjects, "
                         f"live {c.get('live', 0):5d}, spoof {c.get('spoof', 0):5d} ({types})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def render_image(seed: int, index: int, subject: int, spoof_type: int, size: int = 176,
                 illumination: int = 0, environment: int = 0
                 ) -> tuple[np.ndarray, tuple[float, float, float, float], np.ndarray]:
    """Render image ``index`` of a set: ``(uint8 BGR size x size, face box px (x,y,w,h), face mask)``.

    Deterministic in its arguments (its RNG is derived from ``(seed, index)``).  ``spoof_type`` 0
    draws a live face, anything else the corresponding attack.
    """
    r = np.random.default_rng([seed, 0xFACE, index])
    who = subject_identity(seed, subject)
    outdoor = environment == 2 if environment else bool(r.random() < 0.35)
    if spoof_type == 0:
        img, mask = draw_face(who, r, size)
        img = camera(img, r, blur=(0.0, 1.1), noise=(0.5, 6.0))
    else:
        img, mask = attack(who, r, size, spoof_type, outdoor)
        img = camera(img, r, blur=(0.0, 0.9), noise=(0.5, 6.0))
    if illumination == 4:  # dark: lower exposure, more noise
        img = np.clip(img * 0.65 + r.standard_normal(img.shape).astype(np.float32) * 0.01, 0, 1)
    elif illumination == 2:  # strong light
        img = np.clip(img * 1.15, 0, 1)
    box = _box_from_mask(mask)
    return (img * 255.0 + 0.5).astype(np.uint8), box, mask


def _box_from_mask(mask: np.ndarray, margin: float = 0.04) -> tuple[float, float, float, float]:
    """The face box (x, y, w, h) in pixels: the mask's bounding box plus a small margin."""
    ys, xs = np.nonzero(mask > 0.5)
    h, w = mask.shape
    if len(xs) == 0:  # should not happen; fall back to the centre
        return (w * 0.25, h * 0.25, w * 0.5, h * 0.5)
    x0, x1 = float(xs.min()), float(xs.max() + 1)
    y0, y1 = float(ys.min()), float(ys.max() + 1)
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    x0, y0 = max(0.0, x0 - mx), max(0.0, y0 - my)
    x1, y1 = min(float(w), x1 + mx), min(float(h), y1 + my)
    return (x0, y0, x1 - x0, y1 - y0)


def _box224(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    """Pixel box -> integer box in the 224 frame that still covers the pixel box."""
    f = BOX_FRAME / size
    x0, y0 = math.floor(box[0] * f), math.floor(box[1] * f)
    x1 = min(BOX_FRAME, math.ceil((box[0] + box[2]) * f))
    y1 = min(BOX_FRAME, math.ceil((box[1] + box[3]) * f))
    return (max(0, x0), max(0, y0), x1 - max(0, x0), y1 - max(0, y0))


def _work(task: tuple) -> tuple[str, tuple[int, int, int, int]]:
    root, rel, seed, index, subject, spoof_type, size, illum, env = task
    img, box, _ = render_image(seed, index, subject, spoof_type, size, illum, env)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {rel}")
    path = os.path.join(root, rel)
    with open(path, "wb") as f:
        f.write(buf.tobytes())
    b = _box224(box, size)
    r = np.random.default_rng([seed, 0xB0C5, index])
    with open(path[:-4] + "_BB.txt", "w") as f:
        f.write(f"{b[0]} {b[1]} {b[2]} {b[3]} {r.uniform(0.9, 0.9999):.7f}\n")
    return rel, b


def _init_worker() -> None:
    cv2.setNumThreads(1)


# --------------------------------------------------------------------------------------------
# The set
# --------------------------------------------------------------------------------------------


def _plan(seed: int, n_train: int, n_test: int, per_subject: int) -> list[dict[str, Any]]:
    """Every image of the set, in index order: split, subject, label, spoof type, illum, env."""
    r = np.random.default_rng([seed, 0x91A7])
    items: list[dict[str, Any]] = []
    subjects = {"train": list(range(1, n_train + 1)),
                "test": list(range(n_train + 1, n_train + n_test + 1))}
    index = 0
    for split in SPLITS:
        for subj in subjects[split]:
            n_live = per_subject // 2
            labels = [0] * n_live + [1] * (per_subject - n_live)
            if per_subject % 2 and r.random() < 0.5:  # odd count: the extra one either way
                labels = [0] * (per_subject - n_live) + [1] * n_live
            for lab in labels:
                index += 1
                if lab == 0:
                    st, il, en = 0, 0, 0
                else:
                    st = int(r.choice([PHOTO, A4, PC, PAD, PHONE], p=[0.25, 0.25, 0.2, 0.15, 0.15]))
                    il = int(r.choice([1, 2, 3, 4], p=[0.55, 0.15, 0.15, 0.15]))
                    en = int(r.choice([1, 2], p=[0.7, 0.3]))
                items.append({"index": index, "split": split, "subject": subj, "label": lab,
                              "spoof_type": st, "illumination": il, "environment": en})
    return items


def _rel(item: dict[str, Any]) -> str:
    kind = "spoof" if item["label"] else "live"
    return f"Data/{item['split']}/{item['subject']}/{kind}/{item['index']:06d}.jpg"


def _label_vec(item: dict[str, Any]) -> list[int]:
    v = [0] * 44
    v[40] = item["spoof_type"]
    v[41] = item["illumination"]
    v[42] = item["environment"]
    v[43] = item["label"]
    return v


def _params(n_train, n_test, per_subject, seed, size) -> dict[str, Any]:
    # what synth_info.json records and ensure_synth compares: a change here rewrites existing sets
    return {"format_version": FORMAT_VERSION, "generator": "ptanet.data.synth",
            "n_subjects_train": n_train, "n_subjects_test": n_test,
            "images_per_subject": per_subject, "seed": seed, "size": size,
            "jpeg_quality": JPEG_QUALITY}


def write_synth(out_dir: str | os.PathLike, n_subjects_train: int = 24, n_subjects_test: int = 8,
                images_per_subject: int = 80, seed: int = 0, size: int = 176,
                workers: int | None = None, overwrite: bool = False,
                progress: bool = False) -> SynthSummary:
    """Write the synthetic live/spoof set in the CelebA-Spoof layout under ``out_dir``.

    Same arguments -> byte-identical files, whatever ``workers`` is.  ``workers=None`` uses every
    CPU; ``workers=1`` renders in this process.  An existing non-empty ``out_dir`` is an error unless
    ``overwrite``.  The set is built in a temporary sibling directory and renamed into place last.
    """
    if n_subjects_train < 1 or n_subjects_test < 1 or images_per_subject < 2:
        raise ValueError("need >= 1 subject per split and >= 2 images per subject")
    if size < 64:
        raise ValueError("size must be >= 64")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    items = _plan(seed, n_subjects_train, n_subjects_test, images_per_subject)
    for it in items:
        (tmp / _rel(it)).parent.mkdir(parents=True, exist_ok=True)
    tasks = [(str(tmp), _rel(it), seed, it["index"], it["subject"], it["spoof_type"], size,
              it["illumination"], it["environment"]) for it in items]
    n_workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    n_workers = min(n_workers, max(1, len(tasks) // 8))
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(tasks), desc="synth", unit="img")
        except ImportError:
            bar = None
    try:
        if n_workers <= 1:
            for t in tasks:
                _work(t)
                if bar is not None:
                    bar.update(1)
        else:
            # __name__ is this module, where _work lives: the forkserver imports it once
            with pool_context(__name__).Pool(n_workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(_work, tasks, chunksize=16):
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        # labels last: the set only looks complete once these exist (and after the rename)
        meta = tmp / "metas" / "intra_test"
        meta.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            sel = [it for it in items if it["split"] == split]
            labels = {_rel(it): _label_vec(it) for it in sel}
            (meta / f"{split}_label.json").write_text(
                "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in labels.items())
                + "\n}\n")
            (meta / f"{split}_label.txt").write_text(
                "".join(f"{_rel(it)} {it['label']}\n" for it in sel))
        (tmp / "synth_info.json").write_text(
            json.dumps(_params(n_subjects_train, n_subjects_test, images_per_subject, seed, size),
                       indent=1, sort_keys=True))
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    summary = SynthSummary(out_dir=str(out), size=size, seed=seed, seconds=time.perf_counter() - t0,
                           workers=n_workers)
    for split in SPLITS:
        sel = [it for it in items if it["split"] == split]
        summary.counts[split] = {"live": sum(1 for it in sel if it["label"] == 0),
                                 "spoof": sum(1 for it in sel if it["label"] == 1)}
        summary.subjects[split] = len({it["subject"] for it in sel})
        types: dict[str, int] = {}
        for it in sel:
            if it["label"]:
                types[str(it["spoof_type"])] = types.get(str(it["spoof_type"]), 0) + 1
        summary.spoof_types[split] = types
    return summary


def ensure_synth(out_dir: str | os.PathLike, **kwargs: Any) -> SynthSummary | None:
    """Write the set unless ``out_dir`` already holds a complete one made with the same parameters.

    Returns the summary when it wrote, ``None`` when the existing set was reused.
    """
    out = Path(out_dir)
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(write_synth).parameters.items()
                if v.default is not inspect.Parameter.empty}
    args = {**defaults, **kwargs}
    want = _params(args["n_subjects_train"], args["n_subjects_test"], args["images_per_subject"],
                   args["seed"], args["size"])
    info = out / "synth_info.json"
    complete = info.exists() and all(
        (out / "metas" / "intra_test" / f"{s}_label.json").exists() for s in SPLITS)
    if complete:
        try:
            if json.loads(info.read_text()) == want:
                return None
        except (OSError, ValueError):
            pass
    kwargs = dict(kwargs)
    kwargs["overwrite"] = True
    return write_synth(out, **kwargs)
