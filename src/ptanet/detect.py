"""Face detectors for images that come without a face box (own data folders).

A detector is named by a short spec string so it can travel to cache worker processes and into cache
metadata (OpenCV detector objects cannot be pickled): "haar" is OpenCV's bundled frontal-face Haar
cascade (no extra files, the default); "yunet:/path/model.onnx" is OpenCV's FaceDetectorYN with a YuNet
ONNX model (more accurate, needs the model file). Both return the largest face, as a pixel box.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from ptanet.preprocess import Box, Detector
HAAR_MODEL = "haarcascade_frontalface_default.xml"
YUNET_SCORE_THRESHOLD = 0.6


def parse_detect_spec(spec: str) -> tuple[str, str | None]:
    """"haar" -> ("haar", None); "yunet:/m.onnx" -> ("yunet", "/m.onnx"); anything else: ValueError.
    The YuNet model file must exist (FileNotFoundError names it)."""
    kind, _, model = spec.partition(":")
    if kind == "haar" and not model:
        return "haar", None
    if kind == "yunet" and model:
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{model}: YuNet model file not found (detect spec {spec!r})")
        return "yunet", model
    raise ValueError(f"unknown face detector {spec!r}; use 'haar' or 'yunet:/path/to/model.onnx'")


def _largest(boxes: np.ndarray) -> Box | None:
    if len(boxes) == 0:
        return None
    x, y, w, h = boxes[int(np.argmax(boxes[:, 2] * boxes[:, 3]))][:4]
    return int(round(x)), int(round(y)), int(round(w)), int(round(h))


def make_detector(spec: str) -> Detector:
    """A callable: RGB uint8 HxWx3 image -> largest face (x, y, w, h) in pixels, or None."""
    kind, model = parse_detect_spec(spec)
    if kind == "haar":
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_MODEL)
        if cascade.empty():
            raise RuntimeError(f"{cv2.data.haarcascades + HAAR_MODEL}: OpenCV cannot load the Haar cascade")

        def detect_haar(image_rgb: np.ndarray) -> Box | None:
            gray = cv2.equalizeHist(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY))
            faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
            return _largest(np.asarray(faces).reshape(-1, 4))

        return detect_haar

    yunet = cv2.FaceDetectorYN.create(model, "", (320, 320), YUNET_SCORE_THRESHOLD)

    def detect_yunet(image_rgb: np.ndarray) -> Box | None:
        height, width = image_rgb.shape[:2]
        yunet.setInputSize((width, height))
        _, faces = yunet.detect(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        return None if faces is None else _largest(faces[:, :4])

    return detect_yunet
