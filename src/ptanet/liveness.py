"""The liveness check as an application calls it: an image in, every face with its verdict out.

``LivenessChecker`` loads a model (checkpoint or exported ONNX) and a face detector once and is then
called for each image: a numpy array, a file path or the encoded bytes of an upload. Every face the
detector finds gets a result with its box, its spoof probability and a decision, ``"live"``,
``"spoof"`` or ``"not checked"``; a face is never scored when the crop would not resemble what the
model was trained on, and the reason says why:

- smaller than ``min_face`` pixels on its shorter side (the crop would be mostly upscaling);
- more than ``max_outside`` of its (corrected) box outside the image (cut by the border);
- no face at all: an empty list, with the result's ``reason``.

Face boxes are the detector's, corrected to the training crop (``ptanet.detect.BoxCorrection``).
Images are decoded by :func:`decode_image`, which refuses decompression bombs from the header before
decoding, truncated files and non-images; grayscale, RGBA (alpha dropped), 16-bit and EXIF-rotated
JPEGs are read as 8-bit RGB in display orientation.

Thread safety: one checker may be shared by threads. Decoding and face detection run in parallel
(each thread has its own detector: OpenCV's detectors hold state); the model runs under one lock (a
switching PTA model holds state), and ``set_config`` takes the same lock, so each result is computed
with exactly the configuration and threshold it reports.
"""

from __future__ import annotations

import io
import os
import threading
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np

from ptanet import preprocess as _preprocess
from ptanet.configs import all_configs, parse_config
from ptanet.detect import FaceDetector
from ptanet.infer import Predictor
from ptanet.preprocess import ImageReadError

# Pixel limit of decoded images, unless ptanet.preprocess defines one (it then rules both paths).
MAX_PIXELS = getattr(_preprocess, "MAX_PIXELS", 50_000_000)
MIN_FACE = 40  # pixels, shorter side of the detector's box
MAX_OUTSIDE = 0.2  # share of the corrected face box that may lie outside the image
LIVE, SPOOF, NOT_CHECKED = "live", "spoof", "not checked"
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mjpeg", ".mjpg")


class ImageTooLargeError(ImageReadError):
    """An image with more pixels than allowed (a decompression bomb), found from its header."""


def _header_size(data: bytes, name: str) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding the pixels (Pillow reads headers
    lazily); None when Pillow does not know the format (OpenCV's own pixel limit then applies)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns from half its limit: ours decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours
        raise ImageTooLargeError(f"{name}: image is over the pixel limit ({exc})") from None
    except Exception:  # Pillow raises several types for unknown or broken headers
        return None


def _truncated(data: bytes) -> bool:
    """JPEG without its end marker, or PNG without its end chunk. OpenCV decodes those with a warning
    and fills the missing rows with grey, which the model would happily score."""
    tail = data.rstrip(b"\0\r\n ")
    if data[:3] == b"\xff\xd8\xff":
        return not tail.endswith(b"\xff\xd9")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-32:]
    return False


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 HxWx3, in display orientation (EXIF applied for JPEG).

    Refused with an error naming ``name``: empty data, more than ``max_pixels`` pixels (from the header,
    before decoding: ImageTooLargeError), truncated JPEG/PNG, anything OpenCV cannot decode
    (ImageReadError). Grayscale and 16-bit images become 8-bit RGB; an alpha channel is dropped.
    """
    if not data:
        raise ImageReadError(f"{name}: empty file, not an image")
    size = _header_size(data, name)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(f"{name}: image of {size[0]}x{size[1]} pixels is over the limit of "
                                 f"{max_pixels:,} pixels")
    if _truncated(data):
        raise ImageReadError(f"{name}: truncated image (the file ends before the image data does)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # OpenCV's own pixel limit, for formats Pillow cannot read
        raise ImageTooLargeError(f"{name}: OpenCV refuses this image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise ImageReadError(f"{name}: not an image, or a corrupt one (OpenCV cannot decode it)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def array_to_rgb(image: np.ndarray, name: str = "<array>") -> np.ndarray:
    """A numpy image in RGB(A) or grayscale order, uint8 or uint16 (or float in [0, 1]) -> RGB uint8."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) == 0:
        raise ValueError(f"{name}: expected an HxW, HxWx3 or HxWx4 image, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{name}: unsupported image dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def load_image(image: str | os.PathLike | bytes | np.ndarray, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """(RGB uint8 image, name for messages) from a path, encoded bytes or an array."""
    if isinstance(image, np.ndarray):
        return array_to_rgb(image), "<array>"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), "<bytes>", max_pixels), "<bytes>"
    name = os.fspath(image)
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{name}: cannot read image file ({exc.strerror or exc})") from None
    return decode_image(data, name, max_pixels), name


@dataclass
class FaceResult:
    """One face. ``box``: x, y, w, h in pixels (the training crop's box: the detector's corrected;
    it may reach beyond the image); ``spoof_probability`` and ``decision`` ("live"/"spoof"), or
    decision "not checked" with the ``reason`` and no probability."""

    box: list[int]
    spoof_probability: float | None
    decision: str
    reason: str | None = None
    detector_box: list[int] | None = None
    detector_score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LivenessResult:
    """The check of one image: its faces (largest first), the configuration and threshold used, and
    the time taken (``milliseconds`` in all, ``timings`` per step). ``reason`` is set when there is
    no face; ``error`` only in batch results, for an input that could not be read."""

    source: str
    width: int
    height: int
    faces: list[FaceResult]
    config: str | None
    threshold: float
    milliseconds: float
    timings: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _outside_share(box: Sequence[int], width: int, height: int) -> float:
    x, y, w, h = box
    inside_w = max(0, min(x + w, width) - max(x, 0))
    inside_h = max(0, min(y + h, height) - max(y, 0))
    return 1.0 - (inside_w * inside_h) / float(w * h)


class LivenessChecker:
    """Load once, check many images. See the module docstring for what is and is not scored.

    ``model``: a checkpoint (``.pt``) or exported ``.onnx``. ``detect``: ``"haar"``,
    ``"yunet:PATH.onnx"`` or None (the whole image is the face, as for pre-cropped faces).
    ``threshold``: None takes the model's stored one (``ptanet calibrate``), else 0.5.
    ``min_face`` (pixels), ``max_outside`` (0-1) and ``max_faces`` bound what is scored;
    ``max_pixels`` bounds what is decoded.
    """

    def __init__(self, model: str | os.PathLike, detect: str | None = "haar", config: str | None = None,
                 threshold: float | None = None, min_face: int = MIN_FACE, max_outside: float = MAX_OUTSIDE,
                 max_faces: int = 10, max_pixels: int = MAX_PIXELS, threads: int = 1) -> None:
        if not 0.0 <= max_outside < 1.0:
            raise ValueError(f"max_outside must be in [0, 1), got {max_outside!r}")
        if min_face < 1 or max_faces < 1 or max_pixels < 1:
            raise ValueError(f"min_face, max_faces and max_pixels must be >= 1, got {min_face}, {max_faces}, {max_pixels}")
        self.predictor = Predictor(model, config=config, threshold=threshold, box_files=False, threads=threads)
        self.detect = detect
        self.detector = FaceDetector(detect) if detect is not None else None  # fails early on a bad spec
        self._local = threading.local()  # one detector per thread, made on first use
        self.min_face, self.max_outside, self.max_faces, self.max_pixels = min_face, max_outside, max_faces, max_pixels
        self._lock = threading.Lock()

    # --- configuration ----------------------------------------------------------------------------
    @property
    def config(self) -> str | None:
        return self.predictor.config

    @property
    def threshold(self) -> float:
        return self.predictor.threshold

    @property
    def configs(self) -> list[str]:
        """The configurations this model can run: all 27 for a PTA checkpoint, those an exported
        switchable model holds, else its one."""
        if self.predictor.backend == "torch" and self.predictor.config is not None:
            from ptanet.models import is_pta

            if is_pta(self.predictor._backend.model):
                return all_configs()
        if self.predictor.backend == "onnxruntime":
            return [c for c in self.predictor._backend.model.config_names if c != "No PTA"]
        return [self.config] if self.config else []

    def set_config(self, config: str) -> "LivenessChecker":
        """Switch the PTA configuration; waits for a check in progress, so no result mixes two."""
        config = parse_config(config)
        with self._lock:
            self.predictor.set_config(config)
        return self

    # --- checking ---------------------------------------------------------------------------------
    def _faces(self, rgb: np.ndarray, box: Sequence[int] | None) -> list[FaceResult]:
        """Faces with decisions pending (probability None, decision "" for the ones to score)."""
        height, width = rgb.shape[:2]
        if box is not None:
            found = [(list(map(int, box)), None, None)]
        elif self.detector is None:
            found = [([0, 0, width, height], None, None)]
        else:
            found = [(list(f.box), list(f.raw_box), f.score) for f in self._thread_detector().faces(rgb)]
        faces = []
        for i, (fbox, raw, score) in enumerate(found):
            face = FaceResult(box=fbox, spoof_probability=None, decision="", detector_box=raw, detector_score=score)
            side = min(raw[2:] if raw else fbox[2:])
            outside = _outside_share(fbox, width, height)
            if i >= self.max_faces:
                face.decision, face.reason = NOT_CHECKED, f"more than {self.max_faces} faces in the image"
            elif side < self.min_face:
                face.decision, face.reason = NOT_CHECKED, f"face too small ({side} px < {self.min_face} px)"
            elif outside > self.max_outside:
                face.decision, face.reason = NOT_CHECKED, (f"face cut by the image border ({outside:.0%} outside, "
                                                           f"more than {self.max_outside:.0%})")
            faces.append(face)
        return faces

    def _thread_detector(self) -> FaceDetector:
        if self._local.__dict__.get("detector") is None:
            # The first thread takes the one made at construction; others build their own.
            self._local.detector = (self.detector if threading.current_thread() is threading.main_thread()
                                    else FaceDetector(self.detect))
        return self._local.detector

    def _check_decoded(self, items: list[tuple[np.ndarray, str, Sequence[int] | None, float]]) -> list[LivenessResult]:
        """Detect faces (in this thread) and score the decoded images under the lock: one model batch
        for all their faces."""
        results, crops, pending = [], [], []
        for rgb, name, box, decode_ms in items:
            t0 = time.perf_counter()
            faces = self._faces(rgb, box)
            detect_ms = (time.perf_counter() - t0) * 1000.0
            for face in faces:
                if not face.decision:
                    crops.append(self.predictor.preprocess.crop(rgb, box_px=tuple(face.box)))
                    pending.append(face)
            results.append(LivenessResult(
                source=name, width=rgb.shape[1], height=rgb.shape[0], faces=faces, config=None,
                threshold=0.0, milliseconds=0.0,
                timings={"decode": decode_ms, "detect": detect_ms}, reason=None if faces else "no face detected"))
        with self._lock:
            config, threshold = self.config, self.threshold
            t0 = time.perf_counter()
            scores = self.predictor.score_crops(crops) if crops else []
            model_ms = (time.perf_counter() - t0) * 1000.0
        for face, score in zip(pending, scores):
            face.spoof_probability = float(score)  # compared in float64, as Predictor does
            face.decision = SPOOF if face.spoof_probability >= threshold else LIVE
        for r in results:
            r.config, r.threshold = config, threshold
        share = model_ms / max(1, len(items))
        for r in results:
            r.timings["model"] = share
            r.milliseconds = r.timings["decode"] + r.timings["detect"] + share
        return results

    def _decode(self, image) -> tuple[np.ndarray, str, float]:
        t0 = time.perf_counter()
        rgb, name = load_image(image, self.max_pixels)
        return rgb, name, (time.perf_counter() - t0) * 1000.0

    def check(self, image: str | os.PathLike | bytes | np.ndarray, box: Sequence[int] | None = None) -> LivenessResult:
        """Check one image: a path, encoded bytes, or an RGB(A)/grayscale array. ``box`` (x, y, w, h
        pixels) skips the detector. Unreadable input raises ImageReadError (ImageTooLargeError for a
        bomb), both ValueErrors naming the input."""
        rgb, name, decode_ms = self._decode(image)
        return self._check_decoded([(rgb, name, box, decode_ms)])[0]

    def check_batch(self, images: Iterable[str | os.PathLike | bytes | np.ndarray]) -> list[LivenessResult]:
        """Check several images with one model batch; an unreadable one gets a result with ``error``
        (and no faces) instead of stopping the others. Results in input order."""
        decoded: list = []
        for image in images:
            try:
                decoded.append(self._decode(image))
            except ValueError as exc:
                decoded.append(exc)
        ok = self._check_decoded([(rgb, name, None, ms) for rgb, name, ms in
                                  (d for d in decoded if not isinstance(d, Exception))])
        ok_iter = iter(ok)
        return [LivenessResult(source="", width=0, height=0, faces=[], config=self.config, threshold=self.threshold,
                               milliseconds=0.0, error=str(d)) if isinstance(d, Exception) else next(ok_iter)
                for d in decoded]


# --- video --------------------------------------------------------------------------------------
def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax2, bx2) - max(a[0], b[0])), max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


class _Tracks:
    """Faces linked across frames by box overlap (IoU >= 0.3 with the track's last box, greedily,
    largest first); a track unseen for ``patience`` checked frames ends."""

    def __init__(self, window: int, patience: int = 5) -> None:
        self.window, self.patience, self.next_id = window, patience, 0
        self.tracks: dict[int, dict] = {}

    def update(self, faces: list[FaceResult]) -> list[int]:
        ids, free = [], set(self.tracks)
        for face in faces:
            best = max(free, key=lambda t: _iou(self.tracks[t]["box"], face.box), default=None)
            if best is None or _iou(self.tracks[best]["box"], face.box) < 0.3:
                best, self.next_id = self.next_id, self.next_id + 1
                self.tracks[best] = {"box": face.box, "scores": deque(maxlen=self.window), "missed": 0}
            free.discard(best)
            track = self.tracks[best]
            track["box"], track["missed"] = face.box, 0
            if face.spoof_probability is not None:
                track["scores"].append(face.spoof_probability)
            ids.append(best)
        for t in free:
            self.tracks[t]["missed"] += 1
            if self.tracks[t]["missed"] > self.patience:
                del self.tracks[t]
        return ids


def check_video(checker: LivenessChecker, path: str | os.PathLike, every: int = 1, window: int = 5) -> Iterator[dict]:
    """Check every ``every``-th frame of a video file (OpenCV). Yields one dict per checked frame:
    ``frame`` (index from 0), ``time`` (seconds), the frame's ``faces``, each with a ``track`` id and
    the track's ``track_probability`` (mean spoof probability of its last ``window`` scored frames)
    and ``track_decision``."""
    if every < 1 or window < 1:
        raise ValueError(f"every and window must be >= 1, got {every} and {window}")
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{name}: no such video file")
    capture = cv2.VideoCapture(name)
    if not capture.isOpened():
        raise ValueError(f"{name}: OpenCV cannot open this video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    tracks = _Tracks(window)
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                position = capture.get(cv2.CAP_PROP_POS_MSEC)
                seconds = index / fps if fps > 0 else position / 1000.0
                result = checker.check(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                ids = tracks.update(result.faces)
                faces = []
                for face, track_id in zip(result.faces, ids):
                    scores = tracks.tracks[track_id]["scores"]
                    mean = float(np.mean(scores)) if scores else None
                    decision = NOT_CHECKED if mean is None else (SPOOF if mean >= checker.threshold else LIVE)
                    faces.append({**face.to_dict(), "track": track_id, "track_probability": mean,
                                  "track_decision": decision})
                yield {"source": name, "frame": index, "time": round(seconds, 4), "faces": faces,
                       "config": result.config, "threshold": result.threshold,
                       "milliseconds": result.milliseconds, "reason": result.reason}
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise ValueError(f"{name}: no frame could be read from this video")
