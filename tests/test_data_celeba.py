"""Item lists: CelebA-Spoof layout (real nuaa-dev and generated defects), own folders, splits."""

from __future__ import annotations

from collections import Counter

import pytest

from ptanet.data import SPOOF_TYPES, describe_split, load_celeba, load_folder, split_train_val
from ptanet.data.celeba import Item
from ptanet.preprocess import Reason


# --- the real nuaa-dev set ---------------------------------------------------------------------------
@pytest.mark.parametrize("split, live, spoof, subjects", [
    ("train", 989, 1243, {"1", "5", "6", "7", "8", "12", "13", "16"}),
    ("test", 104, 409, {"3", "10", "15"}),
])
def test_nuaa_dev_counts(nuaa_dev, split, live, spoof, subjects):
    result = load_celeba(nuaa_dev, split)
    labels = Counter(item.label for item in result.items)
    assert (labels[0], labels[1]) == (live, spoof) and result.skipped == []
    assert {item.subject for item in result.items} == subjects
    assert result.summary() == f"read {live + spoof} items ({live} live, {spoof} spoof); skipped 0"
    item = result.items[0]
    assert item.rel.startswith(f"Data/{split}/") and item.path.endswith(item.rel)
    assert item.box224 is not None and all(v >= 0 for v in item.box224)
    assert {i.spoof_type for i in result.items} == {0, 1} and SPOOF_TYPES[1] == "Photo"


# --- generated CelebA layout with every known defect --------------------------------------------------
def test_defects_are_skipped_counted_and_reported(tiny_celeba):
    good = [tiny_celeba.add(subject=str(s), label=s % 2) for s in range(4)]
    bad = {
        tiny_celeba.add(box=None): Reason.BOX_MISSING,
        tiny_celeba.add(box=""): Reason.BOX_EMPTY,
        tiny_celeba.add(box="x y w h 0.9"): Reason.BOX_UNPARSABLE,
        tiny_celeba.add(box="10 20"): Reason.BOX_UNPARSABLE,
        tiny_celeba.add(box="-5 10 100 100 0.9"): Reason.BOX_NEGATIVE,
        tiny_celeba.add(box="10 10 0 100 0.9"): Reason.BOX_ZERO,
        tiny_celeba.add(image=False): Reason.IMAGE_MISSING,
    }
    good.append(tiny_celeba.add(subject="9", label=1, spoof_type=8))
    tiny_celeba.labels["train"]["Data/train/1/live/999999.jpg"] = [0, 1]  # too short
    bad["Data/train/1/live/999999.jpg"] = Reason.BAD_LABEL
    result = load_celeba(tiny_celeba.write_labels(), "train")
    assert [item.rel for item in result.items] == good
    assert {s.rel: s.reason for s in result.skipped} == bad
    assert result.items[-1].spoof_type == 8 and result.items[-1].subject == "9"
    summary = result.summary()
    assert summary.startswith("read 5 items (2 live, 3 spoof); skipped 8: 2 box file unparsable")
    for reason in bad.values():
        assert reason in summary


def test_label_file_missing_or_broken_names_the_file(tiny_celeba):
    tiny_celeba.add()
    root = tiny_celeba.root
    with pytest.raises(FileNotFoundError, match="train_label.json"):
        load_celeba(root, "train")
    tiny_celeba.write_labels()
    (root / "metas/intra_test/train_label.json").write_text("{not json")
    with pytest.raises(ValueError, match="train_label.json.*not valid JSON"):
        load_celeba(root, "train")
    (root / "metas/intra_test/train_label.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="train_label.json.*JSON object"):
        load_celeba(root, "train")
    with pytest.raises(FileNotFoundError, match=r"no such protocol.*\['intra_test'\]"):
        load_celeba(root, "train", protocol="protocol1")


def test_other_protocol_by_name(tiny_celeba):
    tiny_celeba.add()
    tiny_celeba.add(label=1)
    root = tiny_celeba.write_labels(protocol="protocol1")
    assert len(load_celeba(root, "train", protocol="protocol1").items) == 2


# --- own folders -------------------------------------------------------------------------------------
def test_load_folder_with_and_without_boxes(tmp_path, write_image):
    root = tmp_path / "faces"
    write_image(root / "live" / "anna" / "a.jpg")
    (root / "live" / "anna" / "a_BB.txt").write_text("10 20 100 120 0.8")
    write_image(root / "live" / "anna" / "deep" / "b.PNG")
    write_image(root / "live" / "c.bmp")
    write_image(root / "spoof" / "bob" / "d.webp")
    write_image(root / "spoof" / "e.jpeg")
    write_image(root / "spoof" / "bad.jpg")
    (root / "spoof" / "bad_BB.txt").write_text("")
    (root / "spoof" / "notes.txt").write_text("not an image")
    result = load_folder(root)
    got = {item.rel: (item.label, item.spoof_type, item.subject, item.box224) for item in result.items}
    assert got == {
        "live/anna/a.jpg": (0, 0, "anna", (10.0, 20.0, 100.0, 120.0)),
        "live/anna/deep/b.PNG": (0, 0, "anna", None),
        "live/c.bmp": (0, 0, "unknown", None),
        "spoof/bob/d.webp": (1, -1, "bob", None),
        "spoof/e.jpeg": (1, -1, "unknown", None),
    }
    assert [(s.rel, s.reason) for s in result.skipped] == [("spoof/bad.jpg", Reason.BOX_EMPTY)]
    assert result.items[0].path == str(root / "live/anna/a.jpg") and result.detect is None
    assert load_folder(root, detect="haar").detect == "haar"


def test_load_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="live/ and/or spoof/"):
        load_folder(tmp_path)
    (tmp_path / "live").mkdir()
    with pytest.raises(ValueError, match="unknown face detector"):
        load_folder(tmp_path, detect="best")


# --- train/validation split ---------------------------------------------------------------------------
def make_items(subject_sizes: dict[str, int]) -> list[Item]:
    return [Item(f"/x/{s}/{i}.jpg", f"{s}/{i}.jpg", i % 2, i % 2, s, None)
            for s, n in subject_sizes.items() for i in range(n)]


def test_subject_split_has_no_shared_subject_and_is_deterministic():
    items = make_items({str(s): 10 + s for s in range(20)})
    train, val = split_train_val(items, 0.2, by="subject", seed=3)
    assert not {i.subject for i in train} & {i.subject for i in val}
    assert len(train) + len(val) == len(items)
    assert abs(len(val) / len(items) - 0.2) < 0.05
    assert (train, val) == split_train_val(items, 0.2, by="subject", seed=3)
    splits = {tuple(sorted({i.subject for i in split_train_val(items, seed=s)[1]})) for s in range(5)}
    assert len(splits) > 1  # the seed matters
    assert [items.index(i) for i in train] == sorted(items.index(i) for i in train)  # order kept


def test_subject_split_with_few_subjects():
    train, val = split_train_val(make_items({"a": 50, "b": 3}), 0.2)
    assert {i.subject for i in train} and {i.subject for i in val}  # one subject each side, at least
    with pytest.raises(ValueError, match="by='random'"):
        split_train_val(make_items({"only": 20}), 0.2)


def test_random_split_proportions():
    items = make_items({"a": 57, "b": 43})
    train, val = split_train_val(items, 0.2, by="random", seed=0)
    assert (len(train), len(val)) == (80, 20) and not set(train) & set(val)
    assert split_train_val(items, 0.2, by="random", seed=0) == (train, val)
    assert split_train_val(items, 0.2, by="random", seed=1) != (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(items, 1.0)
    with pytest.raises(ValueError, match="unknown split"):
        split_train_val(items, by="identity")


def test_describe_split():
    train, val = split_train_val(make_items({"a": 8, "b": 2}), 0.2)
    text = describe_split(train, val)
    assert text.splitlines()[0] == "train: 8 images (4 live, 4 spoof), 1 subjects"
    assert text.splitlines()[1] == "val: 2 images (1 live, 1 spoof), 1 subjects"
    assert "[no spoof images]" in describe_split(train, [i for i in val if i.label == 0])


def test_split_of_nuaa_dev_train(nuaa_dev):
    items = load_celeba(nuaa_dev, "train").items
    train, val = split_train_val(items)
    assert not {i.subject for i in train} & {i.subject for i in val}
    assert 0.1 < len(val) / len(items) < 0.3
    assert describe_split(train, val).count("subjects") == 2
