"""Face crop geometry, normalisation, image reading, augmentations and detectors."""

from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pytest
import torch

from ptanet.data import make_train_augment
from ptanet.detect import make_detector
from ptanet.preprocess import EmptyBoxError, ImageReadError, Preprocess, read_image_rgb


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- box geometry ---------------------------------------------------------------------------------
def test_box_scaling_known_example():
    assert Preprocess().box_to_pixels((50, 50, 124, 124), 448, 448) == (100, 100, 248, 248)


def test_box_scaling_non_square_uses_celeba_formula():
    # x1 = int(x*W/224), y1 = int(y*H/224), w1 = int(w*W/224), h1 = int(h*H/224)
    assert Preprocess().box_to_pixels((10, 20, 30, 40), 640, 480) == (28, 42, 85, 85)


def test_box_is_clamped_to_the_image():
    p = Preprocess()
    assert p.box_to_pixels((200, 210, 100, 100), 224, 224) == (200, 210, 24, 14)
    assert p.crop(noise(224, 224), box_px=(-10, -20, 50, 60)).shape == (128, 128, 3)


@pytest.mark.parametrize("box", [(230, 10, 50, 50), (10, 10, 0.5, 50)])
def test_box_with_nothing_left_raises(box):
    with pytest.raises(ValueError, match="zero size"):
        Preprocess().box_to_pixels(box, 224, 224)
    with pytest.raises(EmptyBoxError):
        Preprocess().crop(noise(224, 224), box224=box)


def test_crop_matches_slice_and_resize():
    image = noise(448, 300)
    p = Preprocess()
    x, y, w, h = p.box_to_pixels((50, 50, 124, 124), 300, 448)
    expected = cv2.resize(image[y:y + h, x:x + w], (128, 128), interpolation=cv2.INTER_AREA)  # shrinking
    np.testing.assert_array_equal(p.crop(image, box224=(50, 50, 124, 124)), expected)
    small = noise(60, 80)
    expected = cv2.resize(small, (128, 128), interpolation=cv2.INTER_LINEAR)  # enlarging, whole image
    np.testing.assert_array_equal(p.crop(small), expected)


def test_box_scale_enlarges_about_the_centre_then_clamps():
    p = Preprocess(box_scale=2.0)
    assert p.region((100, 100, 50, 40), 400, 400) == (75, 80, 100, 80)
    assert p.region((10, 100, 50, 40), 400, 400) == (0, 80, 85, 80)  # cut at the border, not shifted
    assert Preprocess(box_scale=0.5).region((100, 100, 50, 40), 400, 400) == (112, 110, 25, 20)
    assert Preprocess().region((-5, 3, 50, 40), 400, 400) == (0, 3, 45, 40)  # 1.0: only the clamp
    # The enlarged region is what both box sources crop: the data set's 224-frame box and a pixel box.
    image = noise(448, 300)
    x, y, w, h = p.region(p.box_to_pixels((50, 50, 100, 100), 300, 448), 300, 448)
    assert (x, y, w, h) == (0, 0, 266, 400)
    expected = cv2.resize(image[y:y + h, x:x + w], (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(p.crop(image, box224=(50, 50, 100, 100)), expected)
    np.testing.assert_array_equal(p.crop(image, box_px=p.box_to_pixels((50, 50, 100, 100), 300, 448)), expected)
    assert not np.array_equal(expected, Preprocess().crop(image, box224=(50, 50, 100, 100)))


def test_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="not both"):
        Preprocess().crop(noise(10, 10), box224=(0, 0, 1, 1), box_px=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="uint8"):
        Preprocess().crop(noise(10, 10).astype(np.float32))


# --- normalisation and settings -------------------------------------------------------------------
def test_normalize_shapes_and_values():
    p = Preprocess(size=8)
    crops = noise(8, 8)[None].repeat(2, axis=0)
    one, batch = p.normalize(crops[0]), p.normalize(crops)
    assert one.shape == (3, 8, 8) and batch.shape == (2, 3, 8, 8) and batch.dtype == torch.float32
    ref = (torch.from_numpy(crops).float() / 255 - torch.tensor(p.mean)) / torch.tensor(p.std)
    torch.testing.assert_close(batch, ref.permute(0, 3, 1, 2))
    bgr = Preprocess(size=8, color="BGR", mean=(0, 0, 0), std=(1, 1, 1)).normalize(crops[0])
    torch.testing.assert_close(bgr[0], torch.from_numpy(crops[0, :, :, 2]).float() / 255)


def test_preprocess_dict_round_trip_and_validation():
    p = Preprocess(size=96, mean=(0.5, 0.5, 0.5))
    assert Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert Preprocess.from_dict({"size": 64}) == Preprocess(size=64)  # missing keys: defaults
    with pytest.raises(ValueError, match="unknown preprocess setting.*'sise'"):
        Preprocess.from_dict({"sise": 64})
    with pytest.raises(ValueError, match="size"):
        Preprocess(size=0)
    with pytest.raises(ValueError, match="color"):
        Preprocess(color="HSV")
    with pytest.raises(ValueError, match="box_scale"):
        Preprocess(box_scale=0)
    assert Preprocess.from_dict({"size": 64, "box_scale": 1.5}).box_scale == 1.5
    assert Preprocess.from_dict({"size": 64}).box_scale == 1.0  # checkpoints older than the setting: the paper's crop


# --- reading --------------------------------------------------------------------------------------
def test_read_image_rgb_channel_order(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    cv2.imwrite(str(tmp_path / "blue.png"), bgr)
    rgb = read_image_rgb(tmp_path / "blue.png")
    assert rgb.shape == (4, 5, 3) and rgb[0, 0].tolist() == [0, 0, 255]


def test_read_image_rgb_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.jpg"):
        read_image_rgb(tmp_path / "missing.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ImageReadError, match="corrupt.jpg.*cannot decode"):
        read_image_rgb(tmp_path / "corrupt.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        read_image_rgb(tmp_path / "empty.png")


# --- augmentations ---------------------------------------------------------------------------------
def test_augment_keeps_shape_dtype_and_changes_pixels():
    augment = make_train_augment(seed=1)
    crops = [noise(128, 128, seed=i) for i in range(8)]
    outputs = [augment(image=c)["image"] for c in crops]
    assert all(o.shape == (128, 128, 3) and o.dtype == np.uint8 for o in outputs)
    assert any(not np.array_equal(o, c) for o, c in zip(outputs, crops))


def test_augment_ranges_are_explicit_and_seeded_without_global_state():
    jitter, iso = make_train_augment().transforms
    assert jitter.hue == (-0.05, 0.05) and jitter.brightness == (0.8, 1.2) and jitter.p == 0.5
    assert iso.color_shift == (0.01, 0.05) and iso.intensity == (0.1, 0.5) and iso.p == 0.5
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    crop = noise(32, 32)
    a = [make_train_augment(seed=7)(image=crop)["image"] for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state


def test_hflip_mirrors_some_crops_and_only_when_asked():
    # Left half dark, right half bright: colour jitter and noise keep the sides, only a flip swaps them.
    crop = np.zeros((32, 32, 3), np.uint8)
    crop[:, 16:] = 200

    def mirrored(augment) -> list[bool]:
        outs = [augment(image=crop)["image"] for _ in range(40)]
        return [o[:, :16].mean() > o[:, 16:].mean() for o in outs]

    assert not any(mirrored(make_train_augment(seed=3)))
    flips = mirrored(make_train_augment(seed=3, hflip=True))
    assert 5 < sum(flips) < 35  # p = 0.5


def test_affine_moves_or_scales_some_crops_and_only_when_asked():
    crop = np.zeros((64, 64, 3), np.uint8)
    crop[24:40, 24:40] = 255  # a bright square in the centre

    def moved(augment) -> list[bool]:
        out = []
        for _ in range(40):
            bright = augment(image=crop)["image"].mean(axis=2) > 128
            ys, xs = np.nonzero(bright)
            # ISO noise lights a few background pixels (centroid within 0.7 px, area 256-280 measured)
            out.append(max(abs(ys.mean() - 31.5), abs(xs.mean() - 31.5)) > 1.5 or not 240 <= bright.sum() <= 300)
        return out

    assert not any(moved(make_train_augment(seed=4)))
    assert 5 < sum(moved(make_train_augment(seed=4, affine=True))) < 40


def test_zoom_magnifies_some_crops_by_at_most_its_factor():
    crop = np.zeros((64, 64, 3), np.uint8)
    crop[24:40, 24:40] = 255  # a bright 16 x 16 square in the centre

    def bright_areas(augment) -> list[int]:
        outs = [augment(image=crop)["image"] for _ in range(60)]
        assert all(o.shape == crop.shape for o in outs)  # resized back to the crop's size
        return [int((o.mean(axis=2) > 128).sum()) for o in outs]

    assert max(bright_areas(make_train_augment(seed=5, size=64))) <= 300  # zoom 1 (off): never magnified
    areas = bright_areas(make_train_augment(seed=5, zoom=2.0, size=64))
    assert 10 < sum(a > 300 for a in areas) < 50  # p = 0.5
    assert max(areas) <= 34 ** 2  # a window of at least half the side: at most 2x magnified (+ edge pixels)
    with pytest.raises(ValueError, match="zoom"):
        make_train_augment(zoom=0.5)


# --- detectors -------------------------------------------------------------------------------------
def test_detector_specs_are_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown face detector"):
        make_detector("mtcnn")
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        make_detector(f"yunet:{tmp_path / 'nope.onnx'}")


def test_haar_finds_no_face_in_a_flat_image():
    assert make_detector("haar")(np.full((200, 200, 3), 128, np.uint8)) is None


@pytest.mark.parametrize("kind", ["haar", "yunet"])
def test_detectors_find_the_face_in_a_real_image(nuaa_dev, kind):
    spec = "haar" if kind == "haar" else f"yunet:{nuaa_dev.parents[1] / 'models' / 'face_detection_yunet.onnx'}"
    image = read_image_rgb(nuaa_dev / "Data/train/1/live/000001.jpg")
    box = make_detector(spec)(image)
    assert box is not None
    x, y, w, h = box
    height, width = image.shape[:2]
    # nuaa-dev images are 1.8x crops around the face: the face is central and about half the image
    assert abs(x + w / 2 - width / 2) < width / 4 and abs(y + h / 2 - height / 2) < height / 4
    assert width / 4 < w < width
