"""The embedded synthetic live/spoof set (ptanet.data.synth): layout, labels, boxes, determinism."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from ptanet.data import synth
from ptanet.data.synth import writer

TINY = dict(n_subjects_train=2, n_subjects_test=1, images_per_subject=8)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: Path, split: str) -> dict[str, list[int]]:
    return json.loads((root / "metas" / "intra_test" / f"{split}_label.json").read_text())


def _box_px(root: Path, rel: str, width: int) -> tuple[float, float, float, float]:
    fields = (root / rel.replace(".jpg", "_BB.txt")).read_text().split()
    x, y, w, h = (int(v) for v in fields[:4])
    f = width / synth.BOX_FRAME
    return x * f, y * f, w * f, h * f


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return out, synth.write_synth(out, seed=0, workers=1, **TINY)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A few more images for the statistics: 4 subjects x 30."""
    out = tmp_path_factory.mktemp("synth") / "small"
    synth.write_synth(out, n_subjects_train=3, n_subjects_test=1, images_per_subject=30, seed=0,
                      workers=2)
    return out


def test_tiny_is_fast_and_summarised(tiny):
    out, summary = tiny
    assert summary.seconds < 10  # ~0.5 s on 2 CPU cores
    assert summary.counts == {"train": {"live": 8, "spoof": 8}, "test": {"live": 4, "spoof": 4}}
    assert summary.subjects == {"train": 2, "test": 1}
    assert summary.n_images == 24
    text = str(summary)
    assert "24 images" in text and "train" in text and "test" in text
    assert summary.as_dict()["n_images"] == 24
    assert not list(out.parent.glob(".*tmp*"))  # the temporary directory was renamed away


def test_layout_labels_and_txt(tiny):
    out, _ = tiny
    names = set()
    for split in synth.SPLITS:
        labels = _labels(out, split)
        assert labels
        txt = dict(line.split() for line in
                   (out / "metas" / "intra_test" / f"{split}_label.txt").read_text().splitlines())
        assert set(txt) == set(labels)
        for rel, vec in labels.items():
            m = re.fullmatch(rf"Data/{split}/(\d+)/(live|spoof)/(\d{{6}})\.jpg", rel)
            assert m, rel
            assert (out / rel).is_file() and (out / rel.replace(".jpg", "_BB.txt")).is_file()
            names.add(m.group(3))
            assert len(vec) == 44 and all(isinstance(v, int) for v in vec)
            assert vec[:40] == [0] * 40
            spoof = m.group(2) == "spoof"
            assert vec[43] == int(spoof) == int(txt[rel])
            assert (vec[40] == 0) == (not spoof)
            if spoof:
                assert vec[40] in synth.SPOOF_PRINT + synth.SPOOF_REPLAY
                assert 1 <= vec[41] <= 4 and 1 <= vec[42] <= 2
            else:
                assert vec[41] == vec[42] == 0
    assert len(names) == 24  # image numbers unique over the set
    img = cv2.imread(str(out / next(iter(_labels(out, "train")))))
    assert img.shape == (176, 176, 3)


def test_balanced_and_subjects_disjoint(small):
    subjects = {}
    per_subject = Counter()
    for split in synth.SPLITS:
        labels = _labels(small, split)
        subjects[split] = {rel.split("/")[2] for rel in labels}
        for rel, vec in labels.items():
            per_subject[(rel.split("/")[2], vec[43])] += 1
    assert not subjects["train"] & subjects["test"]
    for s in subjects["train"] | subjects["test"]:
        assert per_subject[(s, 0)] == per_subject[(s, 1)] == 15  # each subject: live and spoof
    types = Counter(v[40] for split in synth.SPLITS for v in _labels(small, split).values())
    assert any(types[t] for t in synth.SPOOF_PRINT) and any(types[t] for t in synth.SPOOF_REPLAY)


def test_boxes_inside_frame_and_cover_the_face(tiny):
    out, _ = tiny
    for split in synth.SPLITS:
        for rel in _labels(out, split):
            fields = (out / rel.replace(".jpg", "_BB.txt")).read_text().split()
            assert len(fields) == 5
            x, y, w, h = (int(v) for v in fields[:4])
            assert 0 < float(fields[4]) <= 1
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= synth.BOX_FRAME and y + h <= synth.BOX_FRAME
            assert 0.25 * synth.BOX_FRAME < h < 0.9 * synth.BOX_FRAME  # face ~40-60% of the frame
    # the box covers the drawn head: re-render one live and one spoof of each kind with their masks
    for index, subject, st in [(1, 1, 0), (2, 1, 1), (3, 2, 7), (4, 2, 9), (5, 3, 3)]:
        img, box, mask = synth.render_image(0, index, subject, st, 176)
        bx, by, bw, bh = writer._box224(box, 176)
        f = 176 / synth.BOX_FRAME
        x0, y0, x1, y1 = bx * f, by * f, (bx + bw) * f, (by + bh) * f
        ys, xs = np.nonzero(mask > 0.5)
        assert len(xs) > 500
        assert xs.min() >= x0 - 0.5 and xs.max() + 1 <= x1 + 0.5
        assert ys.min() >= y0 - 0.5 and ys.max() + 1 <= y1 + 0.5
        assert len(xs) / ((x1 - x0) * (y1 - y0)) > 0.5  # and is not much larger than the face


def test_deterministic_and_independent_of_workers(tmp_path, tiny):
    out, _ = tiny
    again = synth.write_synth(tmp_path / "b", seed=0, workers=2, **TINY)
    assert again.workers == 2
    a, b = _files(out), _files(tmp_path / "b")
    assert a.keys() == b.keys() and a == b  # byte-identical, whatever the worker count
    other = _files(Path(synth.write_synth(tmp_path / "c", seed=1, workers=1, **TINY).out_dir))
    assert other.keys() == a.keys()  # same layout, other pixels
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(other.get(k) != a[k] for k in jpgs) == len(jpgs)


def test_existing_dir_overwrite_and_ensure(tmp_path):
    out = tmp_path / "set"
    synth.write_synth(out, seed=3, workers=1, **TINY)
    with pytest.raises(FileExistsError):
        synth.write_synth(out, seed=3, workers=1, **TINY)
    assert synth.ensure_synth(out, seed=3, workers=1, **TINY) is None  # reused
    s = synth.ensure_synth(out, seed=4, workers=1, **TINY)  # other parameters: rewritten
    assert s is not None and json.loads((out / "synth_info.json").read_text())["seed"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer._work

    def flaky(task):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(writer, "_work", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth.write_synth(tmp_path / "set", seed=0, workers=1, **TINY)
    assert list(tmp_path.iterdir()) == []


def _hf_energy(root: Path) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for split in synth.SPLITS:
        for rel, vec in _labels(root, split).items():
            img = cv2.imread(str(root / rel))
            x, y, w, h = (int(round(v)) for v in _box_px(root, rel, img.shape[1]))
            crop = cv2.resize(img[y:y + h, x:x + w], (128, 128), interpolation=cv2.INTER_LINEAR)
            g = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
            feats.append(float(np.abs(cv2.Laplacian(g, cv2.CV_32F)).mean()))
            labels.append(vec[43])
    return np.array(feats), np.array(labels)


def test_learnable_but_not_trivial(small):
    """High-frequency energy in the face crop differs between live and spoof on average, but one
    threshold on it is far from a perfect separator."""
    f, y = _hf_energy(small)
    assert f[y == 1].mean() > f[y == 0].mean()
    best = max(max(((f >= t) == y).mean(), ((f < t) == y).mean()) for t in np.unique(f))
    assert 0.6 <= best <= 0.97, best
