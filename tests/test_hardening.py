"""Bad input a new user might give, through the library and the `ptanet` command: huge and
bomb-like images, a data set whose defects empty a class of the validation part, resuming with
changed settings, malformed model files, paths of the wrong kind, an ill-conditioned model at export,
and what a killed write leaves behind."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

import ptanet.preprocess as preprocess
from conftest import TinyCeleba
from ptanet.atomic import atomic_write, write_json_atomic
from ptanet.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from ptanet.cli import main
from ptanet.data.cache import _Cropper
from ptanet.data.celeba import load_celeba, split_train_val
from ptanet.export import SpoofScorer, _verify, export_onnx
from ptanet.infer import Predictor
from ptanet.models import mobilenet_v2
from ptanet.preprocess import (ImageReadError, ImageTooLargeError, Preprocess, decode_image_rgb, image_size,
                               read_image_rgb)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = Preprocess(size=32)


def _huge_jpeg(path: Path, width: int = 65000, height: int = 65000) -> Path:
    """A small real JPEG whose frame header claims width x height (decoders trust the header)."""
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 120, np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (the shape of a decompression bomb)."""
    ok, buf = cv2.imencode(".png", np.full((16, 16, 3), 7, np.uint8))
    data = bytearray(buf.tobytes())
    data[16:24] = side.to_bytes(4, "big") * 2
    path.write_bytes(bytes(data))
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- 1, 2: huge images and the pixel cap -------------------------------------------------------------
@pytest.mark.parametrize("ext,params", [(".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", []),
                                        (".bmp", []), (".webp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80])])
def test_header_size_is_the_decoded_size(ext, params):
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image, params)
    kind, width, height = image_size(buf)
    assert (width, height) == (53, 37)
    assert cv2.imdecode(buf, cv2.IMREAD_COLOR).shape[:2] == (height, width)


def test_image_beyond_opencvs_limit_is_an_image_read_error(tmp_path):
    path = _huge_jpeg(tmp_path / "huge.jpg")
    # Above OpenCV's own limit of 2^30 pixels with ptanet's cap lifted: cv2.error becomes ours.
    with pytest.raises(ImageReadError, match="huge.jpg: OpenCV cannot decode"):
        read_image_rgb(path, max_pixels=10**12)


def test_pixel_cap_refuses_from_the_header_before_decoding(tmp_path, monkeypatch):
    bomb = _bomb_png(tmp_path / "bomb.png")
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a) or None)
    with pytest.raises(ImageTooLargeError, match=r"bomb.png: PNG of 20000x20000 = 400,000,000 pixels is over the "
                                                 r"limit of 100,000,000"):
        read_image_rgb(bomb)
    with pytest.raises(ImageTooLargeError, match="upload: PNG of 20000x20000"):  # bytes, as the service gets them
        decode_image_rgb(bomb.read_bytes(), "upload")
    assert decoded == []  # no pixel was decoded
    monkeypatch.undo()
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((48, 64, 3), np.uint8))
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 64 * 48 - 1)  # the setting, shared by every reader
    with pytest.raises(ImageTooLargeError, match="small.png"):
        read_image_rgb(small)
    assert read_image_rgb(small, max_pixels=64 * 48).shape == (48, 64, 3)
    # The cache's workers are other processes: the cap travels with the cropper they receive.
    assert pickle.loads(pickle.dumps(_Cropper(SMALL, None))).max_pixels == 64 * 48 - 1
    (tmp_path / "odd.tif").write_bytes(b"II*\x00" + bytes(100))  # a format whose size is not checked
    with pytest.raises(ImageReadError, match="odd.tif: cannot decode this image .not a PNG, JPEG, BMP or WebP"):
        read_image_rgb(tmp_path / "odd.tif")


def test_predict_gives_the_huge_image_an_error_row_and_the_good_ones_scores(tmp_path, capsys):
    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "m.pt", mobilenet_v2().eval(), SMALL.to_dict())
    folder = tmp_path / "images"
    _huge_jpeg(folder / "b_huge.jpg")
    _bomb_png(folder / "c_bomb.png")
    for name in ("a_good.jpg", "d_good.png"):
        cv2.imwrite(str(folder / name), np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    code, out, err = _cli(capsys, "predict", ck, folder, "--format", "json")
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert code == 1 and err == ""
    assert sorted(rows) == ["a_good.jpg", "b_huge.jpg", "c_bomb.png", "d_good.png"]
    assert all(0 <= rows[n]["score"] <= 1 and rows[n]["error"] is None for n in ("a_good.jpg", "d_good.png"))
    assert "b_huge.jpg: JPEG of 65000x65000" in rows["b_huge.jpg"]["error"] and rows["b_huge.jpg"]["score"] is None
    assert "over the limit" in rows["c_bomb.png"]["error"]


# --- 3-6, 11: a defective data set through prepare, train, evaluate, recalibrate and resume ----------
TRAIN_FLAGS = ("--size", "32", "--batch-size", "4", "--epochs", "1", "--val-configs", "HHH", "--bn-configs",
               "HHH,LLL", "--bn-images", "8", "--prepare-workers", "0", "--eval-batch-size", "8")


@pytest.fixture(scope="module")
def defective(tmp_path_factory):
    """A CelebA-layout set whose validation subject's live images are all corrupt (so the validation
    part holds spoof images only once they are dropped) and with one training image whose header
    claims 65000 x 65000 pixels; trained for one epoch through the CLI."""
    base = tmp_path_factory.mktemp("defective")
    tiny = TinyCeleba(base / "data")
    for subject in map(str, range(1, 6)):
        for label in (0, 0, 1, 1):
            tiny.add("train", subject, label)
    for label in (0, 0, 1, 1):
        tiny.add("test", "9", label)
    root = tiny.write_labels()
    _, val = split_train_val(load_celeba(root, "train").items, 0.2, by="subject", seed=0)
    for item in val:
        if item.label == 0:
            Path(item.path).write_bytes(b"\xff\xd8\xff\xe0 cut off")
    train_items = [i for i in load_celeba(root, "train").items if i.subject != val[0].subject]
    _huge_jpeg(Path(train_items[0].path))
    run, cache = base / "run", base / "cache"
    return {"root": root, "run": run, "cache": cache, "n_val": len(val), "base": base}


@pytest.fixture(scope="module")
def trained(defective):
    """Train the defective set through `ptanet train` once; returns (exit code, stdout)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--data", str(defective["root"]), "--out", str(defective["run"]), "--cache",
                     str(defective["cache"]), *TRAIN_FLAGS])
    return code, out.getvalue()


def test_prepare_and_train_report_the_same_skips_and_the_parts_after_dropping(defective, trained, capsys):
    code, train_out = trained
    assert code == 0, train_out
    skips = "skipped 3: 2 image unreadable, 1 image over the pixel limit"
    train_lines = [line for line in train_out.splitlines() if line.startswith(("train", "val", "test"))]
    assert any(line.startswith("train cache:") and skips in line for line in train_lines), train_out
    # The validation part counted after its unreadable live images were dropped, with the warning.
    val_line = next(line for line in train_lines if line.startswith("val:"))
    assert val_line.startswith("val: 2 images (0 live, 2 spoof), 1 subjects  [no live images]")
    assert next(line for line in train_lines if line.startswith("train:")).startswith("train: 15 images (7 live, 8 spoof)")
    code, out, err = _cli(capsys, "prepare", defective["root"], "--cache", defective["cache"], "--size", "32",
                          "--prepare-workers", "0")
    assert code == 0 and "reused" in out
    assert [line.split(";")[0] for line in out.splitlines()] == [line.split(";")[0] for line in train_lines]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("meta.json", "index.json", "progress.json", "crops.npy"):  # the cache's files, as open() makes them
        assert (defective["cache"] / "train" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_history_is_json_with_null_for_an_undefined_acer(defective, trained):
    lines = (defective["run"] / "history.jsonl").read_text().splitlines()

    def no_nan(word):
        raise ValueError(f"bare {word} in history.jsonl")

    records = [json.loads(line, parse_constant=no_nan) for line in lines]
    assert len(records) == 1 and records[0]["val"]["HHH"]["acer"] is None  # one class: no ACER


def test_evaluate_with_a_one_class_validation_part_writes_the_05_rows(defective, trained, capsys):
    out_dir = defective["base"] / "eval"
    code, out, err = _cli(capsys, "evaluate", defective["run"] / "best.pt", "--configs", "HHH", "--out", out_dir)
    assert code == 0, err
    assert "the validation part holds one class only, so it has no EER point" in out
    assert "skipped 3: 2 image unreadable, 1 image over the pixel limit" in out  # reported as train reports it
    rows = json.loads((out_dir / "table3.json").read_text())
    assert rows and {r["threshold_rule"] for r in rows} == {"0.5"}
    assert (out_dir / "table3.md").is_file() and (out_dir / "per_subject.csv").is_file()


def test_recalibrate_reports_the_skips(defective, trained, capsys):
    code, out, err = _cli(capsys, "recalibrate", defective["run"] / "best.pt", "--out",
                          defective["base"] / "recalibrated.pt")
    assert code == 0, err
    assert "skipped 3: 2 image unreadable, 1 image over the pixel limit" in out
    assert "[no live images]" in out


def test_train_refuses_a_batch_larger_than_the_training_part(defective, trained, capsys):
    code, out, err = _cli(capsys, "train", "--data", defective["root"], "--out", defective["base"] / "big-batch",
                          "--cache", defective["cache"], *TRAIN_FLAGS, "--batch-size", "16")
    assert code == 2
    assert "batch_size 16 is larger than the training part (15 images)" in err
    assert not (defective["base"] / "big-batch" / "last.pt").exists()


def test_resume_refuses_changed_settings_naming_old_and_new(defective, trained, capsys):
    run = defective["run"]
    settings_before = (run / "settings.json").read_bytes()
    code, out, err = _cli(capsys, "train", "--out", run, "--resume", "--size", "64", "--seed", "3", "--lr", "0.01",
                          "--batch-size", "8")
    assert code == 2
    line = err.strip()
    assert "\n" not in line and line.startswith(f"ptanet train: error: {run / 'last.pt'}: cannot resume with changed")
    for change in ("size 32 -> 64", "seed 0 -> 3", "lr 0.0001 -> 0.01", "batch_size 4 -> 8"):
        assert change in line
    assert (run / "settings.json").read_bytes() == settings_before


def test_resume_of_a_moved_run_takes_its_own_settings_and_may_run_longer(defective, trained, capsys):
    moved = defective["base"] / "moved"
    shutil.copytree(defective["run"], moved)
    stale = moved / ".last.pt.x1y2z3.tmp"  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"partial")
    # Only the run folder and more epochs given: every other setting is the run's own.
    code, out, err = _cli(capsys, "train", "--out", moved, "--resume", "--epochs", "2")
    assert code == 0, err
    assert not stale.exists()
    settings = json.loads((moved / "settings.json").read_text())
    assert (settings["epochs"], settings["size"], settings["out"]) == (2, 32, str(moved))
    assert load_checkpoint(moved / "last.pt").train_state["epoch"] == 2
    mode = (moved / "last.pt").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_help_marks_what_may_change_on_resume(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    text = " ".join(out[out.index("data settings:"):].split())  # the options, past the usage lines
    helps = {part.split()[0]: part for part in re.split(r" (?=--[a-z-]+ )", text) if part.startswith("--")}
    for flag in ("--epochs", "--workers", "--out", "--cache"):
        assert helps[flag].endswith("[may change on --resume]"), helps[flag]
    for flag in ("--lr", "--size", "--seed", "--batch-size"):
        assert "[may change on --resume]" not in helps[flag]


# --- 7, 8: malformed model files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", mobilenet_v2().eval(), SMALL.to_dict())


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.pop("arch"), "'arch' must be a dict, found missing"),
    (lambda p: p.update(labels={}), "the label map must name classes 0 and 1"),
    (lambda p: p["preprocess"].update(sharpen=2), r"unknown preprocess setting\(s\) \['sharpen'\]"),
    (lambda p: p.update(config="XYZ"), "invalid PTA configuration 'XYZ'"),
    (lambda p: p.update(arch={**p["arch"], "name": "pta_mobilenet_v2", "config": "HQH"}), "cannot rebuild"),
])
def test_malformed_checkpoints_are_one_line_naming_the_file(plain_checkpoint, tmp_path, capsys, damage, message):
    payload = torch.load(plain_checkpoint, weights_only=True)
    damage(payload)
    path = tmp_path / "damaged.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"damaged.pt: .*{message}"):
        load_checkpoint(path)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 40, 3), np.uint8))
    code, out, err = _cli(capsys, "predict", path, tmp_path / "a.png")
    assert code == 2 and err.startswith("ptanet predict: error: ") and "damaged.pt" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def plain_onnx(plain_checkpoint):
    return Path(export_onnx(plain_checkpoint, plain_checkpoint.parent / "m.onnx")["path"])


@pytest.mark.parametrize("key,value,message", [
    ("labels", {}, "the label map must name classes 0 and 1"),
    ("preprocess", {**SMALL.to_dict(), "sharpen": 2}, r"unknown preprocess setting\(s\) \['sharpen'\]"),
    ("config", "XYZ", "invalid PTA configuration 'XYZ'"),
])
def test_malformed_onnx_metadata_is_one_line_naming_the_file(plain_onnx, tmp_path, key, value, message):
    proto = onnx.load(plain_onnx)
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = json.dumps(value)
    path = tmp_path / "damaged.onnx"
    onnx.save(proto, path)
    with pytest.raises(ValueError, match=f"damaged.onnx: .*{message}"):
        Predictor(path)


def test_refused_pickle_names_the_global_and_never_suggests_turning_the_guard_off(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "x": Evil()}, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: the file holds code (a reference to ")
    assert f"{os.system.__module__}.system" in message and "nothing in it ran" in message
    assert "weights_only" not in message and "\n" not in message


# --- 9: paths of the wrong kind --------------------------------------------------------------------------
def test_export_into_an_existing_file_is_one_line(plain_checkpoint, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("a file, not a folder")
    code, out, err = _cli(capsys, "export", plain_checkpoint, "--out", target)
    assert code == 2 and err == f"ptanet export: error: {target}: File exists\n"
    assert target.read_text() == "a file, not a folder"


def test_prepare_into_an_existing_file_is_one_line(defective, tmp_path, capsys):
    target = tmp_path / "cache-file"
    target.write_text("not a folder")
    code, out, err = _cli(capsys, "prepare", defective["root"], "--cache", target, "--prepare-workers", "0")
    assert code == 2 and err.startswith("ptanet prepare: error: ") and str(target) in err and err.count("\n") == 1


# --- 10: export of a barely trained (ill-conditioned) model ------------------------------------------------
def test_export_passes_a_barely_trained_model_and_still_catches_wrong_statistics(defective, trained, tmp_path):
    """One epoch at 32 px leaves recalibrated BatchNorm variances near 1e-14, which magnify float32
    rounding; the check compares with float64 and scales with PyTorch's own float32 error."""
    ck = load_checkpoint(defective["run"] / "best.pt")
    assert min(float(var.min()) for stats in ck.model.bn_stats().values() for _, var in stats.values()) < 1e-9
    result = export_onnx(ck, tmp_path / "m.onnx", config="HHH")
    assert result["max_abs_diff"] > 1e-4  # what the old fixed tolerance refused
    right = ck.model.to_static("HHH").eval()
    ck.model.clear_bn_stats()  # the shared statistics instead of HHH's own
    wrong = ck.model.to_static("HHH").eval()
    from ptanet.export import Deployable, generated_crops
    from ptanet.preprocess import Preprocess

    crops = generated_crops(3, 32)
    preprocess = Preprocess.from_dict(ck.preprocess)
    with pytest.raises(RuntimeError, match="m.onnx: onnxruntime and PyTorch outputs differ"):
        _verify(tmp_path / "m.onnx", Deployable(wrong, preprocess).eval(), crops, tmp_path / "m.onnx")
    assert _verify(tmp_path / "m.onnx", Deployable(right, preprocess).eval(), crops, tmp_path / "m.onnx") >= 0


# --- 11: file modes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_umask_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"), binary=True)
        write_json_atomic(tmp_path / "j.json", {"a": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("b.bin", "j.json")} == {expected}
