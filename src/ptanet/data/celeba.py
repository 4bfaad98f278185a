"""Item lists for CelebA-Spoof (and sets in its layout) and for a plain live/spoof image folder.

Building a list reads only the label JSON and the small `<n>_BB.txt` box files, never the images: at
CelebA-Spoof's 625k images, decoding headers here would dominate. Boxes are therefore kept in the
224x224 frame they are stored in and scaled to pixels when the image is decoded anyway (cache step).

The real data set has defects (missing/empty/garbled box files, label entries without an image, corrupt
images). Each bad item is skipped and recorded with a reason so the rest loads and the user sees what was
dropped and why; corrupt images and faces a detector cannot find are found in the cache step.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptanet import LABELS
from ptanet.preprocess import BOX_SUFFIX, IMAGE_EXTENSIONS, Reason, parse_box_file

# CelebA-Spoof's spoof type, label vector index 40. -1 is ours: a spoof of unknown type (folder data).
SPOOF_TYPES: dict[int, str] = {
    -1: "unknown", 0: "Live", 1: "Photo", 2: "Poster", 3: "A4", 4: "Face Mask", 5: "Upper Body Mask",
    6: "Region Mask", 7: "PC", 8: "Pad", 9: "Phone", 10: "3D Mask",
}
UNKNOWN_SPOOF_TYPE = -1
# Label vector layout (44 ints): [40] spoof type, [41] illumination, [42] environment, [43] live/spoof.
_SPOOF_TYPE_INDEX, _LABEL_INDEX, _LABEL_VECTOR_LEN = 40, 43, 44


@dataclass(frozen=True)
class Item:
    """One image of a data set; `box224` is the face box in the 224x224 frame, None = whole image
    (or: let the detector find it in the cache step)."""

    path: str  # absolute path of the image
    rel: str  # key as in the label JSON (CelebA) or path relative to the folder root
    label: int  # 0 live, 1 spoof (ptanet.LABELS)
    spoof_type: int  # SPOOF_TYPES id
    subject: str  # identity; splits never put one subject in two parts
    box224: tuple[float, float, float, float] | None


@dataclass(frozen=True)
class Skipped:
    """An item left out, why (a `Reason`), and details such as the file and the bad content."""

    rel: str
    reason: str
    detail: str = ""


def count_summary(n_items: int, labels: Counter, skipped: list[Skipped], verb: str = "read") -> str:
    """One line: how many items per label were kept and how many were skipped per reason."""
    per_label = ", ".join(f"{labels.get(k, 0)} {name}" for k, name in LABELS.items())
    text = f"{verb} {n_items} items ({per_label}); skipped {len(skipped)}"
    if skipped:
        reasons = Counter(s.reason for s in skipped)
        text += ": " + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    return text


@dataclass
class LoadResult:
    """Items that loaded, items that were skipped (with reasons), and a detector spec for the cache
    step when the source asks for one."""

    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    detect: str | None = None

    def summary(self) -> str:
        return count_summary(len(self.items), Counter(i.label for i in self.items), self.skipped)


class _DirListing:
    """Names in each directory, listed once: one listdir per folder instead of two stats per image."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def has(self, directory: str, name: str) -> bool:
        if directory not in self._names:
            try:
                self._names[directory] = frozenset(os.listdir(directory))
            except OSError:
                self._names[directory] = frozenset()
        return name in self._names[directory]


def _read_label_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found (expected ROOT/metas/<protocol>/"
                                "<split>_label.json as in CelebA-Spoof)")
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: label file is not valid JSON ({exc})") from exc
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: label file must hold a JSON object {{image path: [44 ints]}}, "
                         f"got {type(labels).__name__}")
    return labels


def _subject_of(rel: str) -> str:
    """`Data/<split>/<subject>/<live|spoof>/<file>` -> subject; else the folder above live/spoof."""
    parts = rel.replace("\\", "/").split("/")
    return parts[2] if len(parts) == 5 else (parts[-3] if len(parts) >= 3 else "unknown")


def load_celeba(root: str | os.PathLike, split: str, protocol: str = "intra_test") -> LoadResult:
    """List the items of one split ("train" / "test") of a CelebA-Spoof-layout set.

    Labels come from `root/metas/<protocol>/<split>_label.json`; boxes from `<n>_BB.txt` beside each
    image. A missing or broken label file raises (FileNotFoundError / ValueError naming the file); bad
    items are skipped and listed in `.skipped`.
    """
    root = Path(root).resolve()
    label_path = root / "metas" / protocol / f"{split}_label.json"
    if not (root / "metas" / protocol).is_dir() and (root / "metas").is_dir():
        found = sorted(p.name for p in (root / "metas").iterdir() if p.is_dir())
        raise FileNotFoundError(f"{root / 'metas' / protocol}: no such protocol folder; found {found}")
    labels = _read_label_json(label_path)
    listing = _DirListing()
    items: list[Item] = []
    skipped: list[Skipped] = []
    for rel, vector in labels.items():
        if (not isinstance(vector, list) or len(vector) < _LABEL_VECTOR_LEN
                or vector[_LABEL_INDEX] not in (0, 1) or not isinstance(vector[_SPOOF_TYPE_INDEX], int)):
            skipped.append(Skipped(rel, Reason.BAD_LABEL, f"{label_path}: {str(vector)[:80]}"))
            continue
        path = os.path.join(root, rel)
        directory, name = os.path.split(path)
        if not listing.has(directory, name):
            skipped.append(Skipped(rel, Reason.IMAGE_MISSING, path))
            continue
        box_name = os.path.splitext(name)[0] + BOX_SUFFIX
        if not listing.has(directory, box_name):
            skipped.append(Skipped(rel, Reason.BOX_MISSING, os.path.join(directory, box_name)))
            continue
        box, reason, detail = parse_box_file(os.path.join(directory, box_name))
        if box is None:
            skipped.append(Skipped(rel, reason, detail))
            continue
        items.append(Item(path=path, rel=rel, label=int(vector[_LABEL_INDEX]),
                          spoof_type=int(vector[_SPOOF_TYPE_INDEX]), subject=_subject_of(rel),
                          box224=box))
    return LoadResult(items, skipped)


def load_folder(root: str | os.PathLike, detect: str | None = None) -> LoadResult:
    """List images under `root/live/**` and `root/spoof/**` (jpg, jpeg, png, bmp, webp; any nesting).

    A `<stem>_BB.txt` beside an image gives its face box (224-frame format); without one the whole
    image is the face, or, with `detect` ("haar" or "yunet:/path/model.onnx"), a detector finds the
    largest face in the cache step. The subject is the first sub-folder under live/ or spoof/
    ("unknown" for images directly inside). Spoof type: 0 live, -1 unknown spoof.
    """
    from ptanet.detect import parse_detect_spec  # validate early, before a long cache step

    root = Path(root).resolve()
    if detect is not None:
        parse_detect_spec(detect)
    class_dirs = {label: root / name for label, name in LABELS.items()}
    if not any(d.is_dir() for d in class_dirs.values()):
        raise FileNotFoundError(f"{root}: expected sub-folders live/ and/or spoof/ with images")
    items: list[Item] = []
    skipped: list[Skipped] = []
    for label, class_dir in class_dirs.items():
        if not class_dir.is_dir():
            continue
        found: list[Item] = []
        for dirpath, _, filenames in os.walk(class_dir):
            for name in filenames:
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, name)
                rel = Path(path).relative_to(root).as_posix()
                inner = Path(path).relative_to(class_dir).parts
                subject = inner[0] if len(inner) > 1 else "unknown"
                box_path = os.path.join(dirpath, os.path.splitext(name)[0] + BOX_SUFFIX)
                box = None
                if os.path.exists(box_path):
                    box, reason, detail = parse_box_file(box_path)
                    if box is None:
                        skipped.append(Skipped(rel, reason, detail))
                        continue
                found.append(Item(path=path, rel=rel, label=label,
                                  spoof_type=0 if label == 0 else UNKNOWN_SPOOF_TYPE,
                                  subject=subject, box224=box))
        items.extend(sorted(found, key=lambda item: item.rel))
    return LoadResult(items, skipped, detect=detect)


def split_train_val(items: list[Item], val_fraction: float = 0.2, by: str = "subject",
                    seed: int = 0) -> tuple[list[Item], list[Item]]:
    """Split a training list into train and validation parts, deterministically for a given seed.

    by="subject": whole subjects go to one part, so no identity is in both (a face seen in training
    would flatter validation); subjects are taken in seeded random order while they fit into
    `val_fraction` of the images (plus one if that gets closer), with at least one subject each side.
    by="random": the paper's random 80/20 image split. Both keep the input order within each part.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(items) < 2:
        raise ValueError(f"need at least 2 items to split into train and validation, got {len(items)}")
    rng = np.random.default_rng(seed)
    target = val_fraction * len(items)
    if by == "random":
        n_val = min(max(round(target), 1), len(items) - 1)
        val_idx = set(rng.permutation(len(items))[:n_val].tolist())
    elif by == "subject":
        counts = Counter(item.subject for item in items)
        if len(counts) < 2:
            raise ValueError(f"cannot split by subject: all {len(items)} items belong to subject "
                             f"{next(iter(counts))!r}; use by='random' (val_split='random') instead")
        subjects = sorted(counts)
        order = [subjects[i] for i in rng.permutation(len(subjects))]
        val_subjects, total = set(), 0
        for subject in order:  # fill up to the target in random subject order
            if total + counts[subject] <= target:
                val_subjects.add(subject)
                total += counts[subject]
        rest = [s for s in order if s not in val_subjects]
        closest = min(rest, key=lambda s: abs(total + counts[s] - target))
        # one more subject when that gets closer to the target (or val is still empty), but always
        # leave at least one subject for training
        if len(rest) > 1 and (not val_subjects
                              or abs(total + counts[closest] - target) < abs(total - target)):
            val_subjects.add(closest)
        val_idx = {i for i, item in enumerate(items) if item.subject in val_subjects}
    else:
        raise ValueError(f"unknown split {by!r}; use 'subject' or 'random'")
    train = [item for i, item in enumerate(items) if i not in val_idx]
    val = [item for i, item in enumerate(items) if i in val_idx]
    return train, val


def describe_split(train: list[Item], val: list[Item]) -> str:
    """Counts per part and label, subjects per part, and a warning when a part lacks a class."""
    return describe_parts({name: ([i.label for i in part], [i.subject for i in part])
                           for name, part in (("train", train), ("val", val))})


def describe_parts(parts: dict[str, tuple[list[int], list[str]]]) -> str:
    """One line per part (``{name: (labels, subjects)}``): images per label, subjects, and a warning
    when the part lacks a class (a validation part without live or spoof images has no ACER)."""
    lines = []
    for name, (labels, subjects) in parts.items():
        counts = Counter(int(label) for label in labels)
        per_label = ", ".join(f"{counts.get(k, 0)} {v}" for k, v in LABELS.items())
        line = f"{name}: {len(labels)} images ({per_label}), {len(set(subjects))} subjects"
        missing = [v for k, v in LABELS.items() if counts.get(k, 0) == 0]
        if missing:
            line += f"  [no {'/'.join(missing)} images]  (its ACER and EER are undefined)"
        lines.append(line)
    return "\n".join(lines)
