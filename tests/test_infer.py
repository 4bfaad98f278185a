"""Predictor: scores in [0, 1] from checkpoints and ONNX files alike, run-time configuration switching,
box choice (given > box file > detector > whole image) and per-image errors that do not stop a batch."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ptanet.checkpoint import save_checkpoint
from ptanet.preprocess import Preprocess, read_image_rgb
from ptanet.export import export_onnx
from ptanet.infer import Predictor
from ptanet.models import pta_mobilenet_v2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random PTA checkpoint (BatchNorm statistics from random batches, so activations and scores
    vary instead of collapsing to 0.5) and its LHH configuration exported to ONNX."""
    torch.manual_seed(0)
    model = pta_mobilenet_v2()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for cfg in ("HHH", "LLL", "BBB"):
            model.set_config(cfg)(torch.randn(4, 3, 64, 64))
        model.classifier[1].weight.mul_(5)  # spread the scores over (0, 1)
    model.eval().set_config("HHH")
    root = tmp_path_factory.mktemp("models")
    ckpt = save_checkpoint(root / "pta.pt", model, Preprocess().to_dict())
    onnx_path = root / "pta_LHH.onnx"
    export_onnx(ckpt, onnx_path, config="LHH")
    return ckpt, onnx_path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Generated images: gradients and noise, one with a box file, one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 200, dtype=np.float32)
    gradient = np.stack([np.tile(ramp, (150, 1)), np.tile(ramp[:150, None], (1, 200)), np.full((150, 200), 90)], -1)
    cv2.imwrite(str(root / "a_gradient.png"), gradient.astype(np.uint8))
    cv2.imwrite(str(root / "b_noise.jpg"), rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "c_boxed.png"), rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    (root / "c_boxed_BB.txt").write_text("20 30 100 120 0.99\n")
    (root / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "sub").mkdir()
    cv2.imwrite(str(root / "sub" / "e_flat.png"), np.full((100, 100, 3), 128, np.uint8))
    return root


def _real_images(nuaa_dev: Path, n_per_class: int = 2) -> list[Path]:
    """The first images of one test subject, live and spoof; a box file lies beside each."""
    folder = nuaa_dev / "Data" / "test" / "3"
    return [p for cls in ("live", "spoof") for p in sorted((folder / cls).glob("*.jpg"))[:n_per_class]]


def test_folder_batches_with_a_corrupt_file(models, images):
    predictor = Predictor(models[0])
    rows = predictor.predict_paths(images, batch_size=2)  # a folder: recursive, sorted
    assert [Path(r["path"]).name for r in rows] == ["a_gradient.png", "b_noise.jpg", "c_boxed.png", "d_corrupt.jpg", "e_flat.png"]
    bad = rows[3]
    assert bad["score"] is None and bad["label"] is None
    assert "d_corrupt.jpg" in bad["error"] and "cannot decode" in bad["error"]
    good = [r for r in rows if r is not bad]
    for r in good:
        assert r["error"] is None and 0.0 <= r["score"] <= 1.0 and r["config"] == "HHH"
        assert r["label"] == ("spoof" if r["score"] >= 0.5 else "live")
    assert len({round(r["score"], 6) for r in good}) > 1  # the model does tell images apart
    assert rows[0]["box_source"] == "image" and rows[0]["box_px"] == (0, 0, 200, 150)
    # The box file beside c_boxed.png is in the 224 frame; the image is 224x224, so pixels equal it.
    assert rows[2]["box_source"] == "file" and rows[2]["box_px"] == (20, 30, 100, 120)
    # Batching changes nothing, and a single image gives the same row.
    one_by_one = predictor.predict_paths([r["path"] for r in rows], batch_size=1)
    assert [r["score"] for r in one_by_one] == pytest.approx([r["score"] for r in rows], abs=1e-6)
    assert predictor.predict_image(images / "c_boxed.png")["score"] == pytest.approx(rows[2]["score"], abs=1e-6)
    # Folders inside a list (as the command line passes them) expand too.
    mixed = predictor.predict_paths([images / "e_flat.png", images], batch_size=4)
    assert [Path(r["path"]).name for r in mixed] == ["e_flat.png"] + [Path(r["path"]).name for r in rows]
    missing = predictor.predict_image(images / "nope.png")
    assert missing["label"] is None and "nope.png" in missing["error"]


def test_box_choice_and_arrays(models, images):
    predictor = Predictor(models[0], box_files=False)
    assert predictor.predict_image(images / "c_boxed.png")["box_source"] == "image"
    rgb = read_image_rgb(images / "c_boxed.png")
    given = predictor.predict_image(rgb, box224=(20, 30, 100, 120))
    from_file = Predictor(models[0]).predict_image(images / "c_boxed.png")
    assert given["path"] is None and given["box_source"] == "given"
    assert given["score"] == pytest.approx(from_file["score"], abs=1e-6)
    outside = predictor.predict_image(rgb, box224=(230, 230, 10, 10))
    assert outside["label"] is None and "zero size" in outside["error"]
    with pytest.raises(ValueError, match="threshold"):
        Predictor(models[0], threshold=50)
    with pytest.raises(ValueError, match="unknown face detector"):
        Predictor(models[0], detect="mtcnn")


def test_switching_configuration(models, images):
    predictor = Predictor(models[0], config="lll")
    model = predictor._backend.model
    lll = [r["score"] for r in predictor.predict_paths(images)]
    hhh = [r["score"] for r in predictor.set_config("HHH").predict_paths(images)]
    assert predictor.config == "HHH" and predictor._backend.model is model  # switched in place
    assert max(abs(a - b) for a, b in zip(lll[:3], hhh[:3])) > 1e-3
    with pytest.raises(ValueError, match=r"H \(heavy\), L \(light\) or B \(both\)"):
        predictor.set_config("HXH")


def test_onnx_equals_torch(models, images):
    ckpt, onnx_path = models
    paths = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg"))
    torch_rows = Predictor(ckpt, config="LHH").predict_paths(paths)
    onnx_pred = Predictor(onnx_path)
    assert onnx_pred.backend == "onnxruntime" and onnx_pred.config == "LHH"
    assert onnx_pred.preprocess == Preprocess()  # from the file's metadata
    onnx_rows = onnx_pred.predict_paths(paths, batch_size=3)
    assert len(onnx_rows) == len(paths) == 5
    for t, o in zip(torch_rows, onnx_rows):
        assert (t["path"], t["label"], t["box_px"], t["error"]) == (o["path"], o["label"], o["box_px"], o["error"])
        if t["score"] is not None:
            assert abs(t["score"] - o["score"]) < 1e-4
    with pytest.raises(ValueError, match="holds configuration LHH only"):
        onnx_pred.set_config("HHH")
    onnx_pred.set_config("lhh")  # its own configuration is fine


def test_real_images_with_box_files(models, nuaa_dev):
    paths = _real_images(nuaa_dev)
    rows = Predictor(models[0], config="LHH").predict_paths(paths)
    for path, row in zip(paths, rows):
        assert row["error"] is None and row["box_source"] == "file" and 0.0 <= row["score"] <= 1.0
        height, width = read_image_rgb(path).shape[:2]
        x, y, w, h = row["box_px"]
        assert 0 <= x < x + w <= width and 0 <= y < y + h <= height
    onnx_scores = [r["score"] for r in Predictor(models[1]).predict_paths(paths)]
    assert onnx_scores == pytest.approx([r["score"] for r in rows], abs=1e-4)


@pytest.mark.parametrize("detector", ["haar", "yunet"])
def test_detectors_find_the_face(models, images, nuaa_dev, detector):
    path = _real_images(nuaa_dev, 1)[0]
    yunet = nuaa_dev.parents[1] / "models" / "face_detection_yunet.onnx"  # shared/models/
    spec = "haar" if detector == "haar" else f"yunet:{yunet}"
    predictor = Predictor(models[0], detect=spec, box_files=False)  # ignore the box file: detect
    row = predictor.predict_image(path)
    assert row["error"] is None and row["box_source"] == "detector" and 0.0 <= row["score"] <= 1.0
    # The detected face overlaps the annotated one (box file) substantially.
    x, y, w, h = row["box_px"]
    fx, fy, fw, fh = Predictor(models[0]).predict_image(path)["box_px"]
    inter = max(0, min(x + w, fx + fw) - max(x, fx)) * max(0, min(y + h, fy + fh) - max(y, fy))
    assert inter / (w * h + fw * fh - inter) > 0.4
    flat = predictor.predict_image(images / "sub" / "e_flat.png")
    assert flat["label"] is None and flat["score"] is None
    assert "e_flat.png" in flat["error"] and "no face detected" in flat["error"]
