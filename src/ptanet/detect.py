"""Face detectors for images that come without a face box (own data folders, photos, video).

A detector is named by a short spec string so it can travel to cache worker processes and into cache
metadata (OpenCV detector objects cannot be pickled): "haar" is OpenCV's bundled frontal-face Haar
cascade (no extra files, the default); "yunet:/path/model.onnx" is OpenCV's FaceDetectorYN with a YuNet
ONNX model (more accurate, needs the model file).

A detector's box is not the box the training data was cropped with: CelebA-Spoof's (and nuaa-dev's)
boxes come from their own detector, and a Haar box is larger and placed differently. Each detector
therefore carries a `BoxCorrection`, fitted on nuaa-dev's training images (``ptanet fit-detector``)
and stored as data in ``ptanet/detectors.json``, which maps its box onto the training box. Calling a
`FaceDetector` returns the largest face, corrected; `faces` returns every face.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources

import cv2
import numpy as np

from ptanet.preprocess import Box

HAAR_MODEL = "haarcascade_frontalface_default.xml"
YUNET_SCORE_THRESHOLD = 0.6
CORRECTIONS_FILE = "detectors.json"


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


@dataclass(frozen=True)
class BoxCorrection:
    """Detector box -> training box, relative to the box itself: the centre moves by (dx * w, dy * h)
    and the sides scale by (sw, sh). Relative, with no absolute offset, because a photo's face can be
    anywhere and of any size: nuaa-dev's boxes all sit near (50, 50, 124, 124) of the 224 frame, and a
    general affine map fitted on them would learn that constant instead of the detector's bias."""

    dx: float = 0.0
    dy: float = 0.0
    sw: float = 1.0
    sh: float = 1.0

    def apply(self, box: Box) -> Box:
        x, y, w, h = (float(v) for v in box)
        cx, cy = x + w / 2 + self.dx * w, y + h / 2 + self.dy * h
        new_w, new_h = w * self.sw, h * self.sh
        return (int(round(cx - new_w / 2)), int(round(cy - new_h / 2)),
                max(1, int(round(new_w))), max(1, int(round(new_h))))

    @classmethod
    def fit(cls, detected: np.ndarray, target: np.ndarray) -> "BoxCorrection":
        """Least squares over pairs of pixel boxes (N x 4, x y w h): each of the four parameters
        minimises its own squared error in pixels (centre offset proportional to the side, side ratio)."""
        d, t = np.asarray(detected, np.float64).reshape(-1, 4), np.asarray(target, np.float64).reshape(-1, 4)
        if len(d) == 0 or len(d) != len(t):
            raise ValueError(f"need matching, non-empty box lists to fit a correction, got {len(d)} and {len(t)}")
        dcx, dcy = d[:, 0] + d[:, 2] / 2, d[:, 1] + d[:, 3] / 2
        tcx, tcy = t[:, 0] + t[:, 2] / 2, t[:, 1] + t[:, 3] / 2
        w2, h2 = np.sum(d[:, 2] ** 2), np.sum(d[:, 3] ** 2)
        return cls(dx=float(np.sum(d[:, 2] * (tcx - dcx)) / w2), dy=float(np.sum(d[:, 3] * (tcy - dcy)) / h2),
                   sw=float(np.sum(d[:, 2] * t[:, 2]) / w2), sh=float(np.sum(d[:, 3] * t[:, 3]) / h2))

    def to_dict(self) -> dict:
        return asdict(self)


def stored_corrections() -> dict[str, dict]:
    """The package's ``detectors.json``: per detector kind, its correction and how it was fitted."""
    try:
        text = resources.files("ptanet").joinpath(CORRECTIONS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return json.loads(text)


def correction_for(kind: str) -> BoxCorrection:
    """The stored correction of a detector kind ("haar", "yunet"); identity when none is stored."""
    entry = stored_corrections().get(kind, {})
    return BoxCorrection(**entry.get("correction", {}))


@dataclass(frozen=True)
class Face:
    """One detected face: ``box`` corrected to the training box, ``raw_box`` as the detector gave it
    (both x, y, w, h in pixels; the corrected box may reach beyond the image), detector ``score``
    (None for Haar, which gives none)."""

    box: Box
    raw_box: Box
    score: float | None


class FaceDetector:
    """A detector from its spec. ``correct=False`` gives the detector's own boxes (for fitting).
    Not thread-safe (OpenCV's YuNet keeps its input size as state): one per thread, or a lock."""

    def __init__(self, spec: str, correct: bool = True) -> None:
        self.spec = spec
        self.kind, model = parse_detect_spec(spec)
        self.correction = correction_for(self.kind) if correct else BoxCorrection()
        if self.kind == "haar":
            self._cascade = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_MODEL)
            if self._cascade.empty():
                raise RuntimeError(f"{cv2.data.haarcascades + HAAR_MODEL}: OpenCV cannot load the Haar cascade")
        else:
            self._yunet = cv2.FaceDetectorYN.create(model, "", (320, 320), YUNET_SCORE_THRESHOLD)

    def _detect(self, image_rgb: np.ndarray) -> list[tuple[np.ndarray, float | None]]:
        if self.kind == "haar":
            gray = cv2.equalizeHist(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY))
            faces = self._cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
            return [(f, None) for f in np.asarray(faces).reshape(-1, 4)]
        height, width = image_rgb.shape[:2]
        self._yunet.setInputSize((width, height))
        _, faces = self._yunet.detect(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        return [] if faces is None else [(f[:4], float(f[14])) for f in faces]

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        """Every face in an RGB uint8 image, largest first."""
        found = []
        for box, score in self._detect(image_rgb):
            raw = tuple(int(round(float(v))) for v in box)
            found.append(Face(box=self.correction.apply(raw), raw_box=raw, score=score))
        return sorted(found, key=lambda f: -f.raw_box[2] * f.raw_box[3])

    def __call__(self, image_rgb: np.ndarray) -> Box | None:
        """The largest face's corrected box, or None (the `preprocess.Detector` protocol)."""
        faces = self.faces(image_rgb)
        return faces[0].box if faces else None


def make_detector(spec: str, correct: bool = True) -> FaceDetector:
    """A callable: RGB uint8 HxWx3 image -> largest face (x, y, w, h) in pixels, or None."""
    return FaceDetector(spec, correct=correct)
