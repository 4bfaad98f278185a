"""The one face crop and normalisation used by training, evaluation, inference and export.

The paper (Section 4) crops each image to its face box, resizes the crop to 128x128 and feeds RGB to the
network. Keeping all of that in one frozen `Preprocess` that checkpoints store (`to_dict`) means a model is
always run on exactly the input it was trained on, whatever entry point loads it. Which box an image is
cropped with is decided by `choose_box`, the one rule shared by the crop cache and prediction; box files
(`<stem>_BB.txt`, CelebA-Spoof's) are read by `parse_box_file` for the data readers and prediction alike.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import torch


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BOX_SUFFIX = "_BB.txt"
# Decompression-bomb guard: images with more pixels than this are refused from their header, before
# any pixel is decoded (a 1.2 MB solid-colour 20000x20000 PNG decodes to 1.2 GB, 2.4 GB at peak).
# 100 megapixels is 8x CelebA-Spoof's largest originals and a 108 MP phone photo's order of size;
# settable here (or per call), or by the environment variable PTANET_MAX_PIXELS.
MAX_PIXELS = int(os.environ.get("PTANET_MAX_PIXELS", 100_000_000))
Box = tuple[int, int, int, int]  # x, y, w, h in pixels
Detector = Callable[[np.ndarray], "Box | None"]


class Reason:
    """Why an item yields no crop; shared by the list readers, the cache step and prediction, so that
    reports count the same defects under the same names."""

    IMAGE_MISSING = "image file missing"
    BOX_MISSING = "box file missing"
    BOX_EMPTY = "box file empty"
    BOX_UNPARSABLE = "box file unparsable"
    BOX_NEGATIVE = "box has negative values"
    BOX_ZERO = "box has zero size"
    BAD_LABEL = "bad label entry"
    IMAGE_UNREADABLE = "image unreadable"
    IMAGE_TOO_LARGE = "image over the pixel limit"
    NO_FACE = "no face detected"


class ImageReadError(ValueError):
    """An image file that does not exist or that OpenCV cannot decode (message names the file)."""


class ImageTooLargeError(ImageReadError):
    """An image whose header claims more pixels than the cap (``MAX_PIXELS``); it was not decoded."""


class EmptyBoxError(ValueError):
    """A face box that has no pixels left once scaled to the image and clamped to it."""


def image_size(data: bytes | np.ndarray) -> tuple[str, int, int] | None:
    """(format, width, height) read from a PNG, JPEG, BMP or WebP header; None for any other bytes.

    Only the header is parsed, so this costs microseconds whatever the image claims to hold; OpenCV
    itself has no header-only call (a reduced decode still inflates a whole PNG). Raises ValueError
    when a known format's header is cut short or malformed.
    """
    # A view, not a copy: a JPEG's frame header may follow large metadata segments.
    b = memoryview(np.ascontiguousarray(data, dtype=np.uint8) if isinstance(data, np.ndarray) else data).cast("B")
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
            width, height = struct.unpack(">II", b[16:24])
            return "PNG", width, height
        if b[:2] == b"BM":
            header = struct.unpack("<I", b[14:18])[0]
            if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                width, height = struct.unpack("<HH", b[18:22])
            else:
                width, height = struct.unpack("<ii", b[18:26])
            return "BMP", abs(width), abs(height)  # a negative height means rows stored top-down
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            chunk = bytes(b[12:16])
            if chunk == b"VP8X":  # extended: 24-bit (width - 1), (height - 1)
                return "WebP", int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
            if chunk == b"VP8L":  # lossless: 14 bits each of (width - 1), (height - 1) after a 0x2f byte
                bits = struct.unpack("<I", b[21:25])[0]
                return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 ":  # lossy: 14-bit width and height after the key-frame start code
                width, height = struct.unpack("<HH", b[26:30])
                return "WebP", width & 0x3FFF, height & 0x3FFF
            raise ValueError(f"unknown WebP chunk {chunk!r}")
        if b[:2] == b"\xff\xd8":
            i = 2
            while i + 4 <= len(b):
                if b[i] != 0xFF:
                    raise ValueError("JPEG marker expected")
                marker = b[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
                    i += 2
                    continue
                length = struct.unpack(">H", b[i + 2:i + 4])[0]
                # SOF0-SOF15 hold the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    height, width = struct.unpack(">HH", b[i + 5:i + 9])
                    return "JPEG", width, height
                if marker == 0xDA:  # start of scan before any frame header
                    break
                i += 2 + length
            raise ValueError("no frame header (SOF) found")
    except struct.error:
        raise ValueError("header cut short") from None
    return None


def read_image_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to an RGB uint8 HxWx3 array (see :func:`decode_image_rgb`).

    The bytes are read with numpy and decoded with `cv2.imdecode` so that non-ASCII paths work on
    every platform; errors are ImageReadError naming the file.
    """
    try:
        data = np.fromfile(os.fspath(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read image file ({exc.strerror or exc})") from exc
    return decode_image_rgb(data, os.fspath(path), max_pixels)


def decode_image_rgb(data: bytes | np.ndarray, name: str = "<image bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode the bytes of an image file (an upload, say) to an RGB uint8 HxWx3 array.

    The size is read from the header first and an image over ``max_pixels`` (default
    :data:`MAX_PIXELS`) is refused before any pixel is decoded (ImageTooLargeError), as is any file
    that is not PNG, JPEG, BMP or WebP (its size cannot be checked). OpenCV returns None instead of
    raising on corrupt bytes and raises cv2.error beyond its own pixel limit; both become an
    ImageReadError naming ``name``.
    """
    cap = MAX_PIXELS if max_pixels is None else max_pixels
    data = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if not data.size:
        raise ImageReadError(f"{name}: empty file, not an image")
    try:
        header = image_size(data)
    except ValueError as exc:
        raise ImageReadError(f"{name}: cannot decode this image (corrupt header: {exc})") from None
    if header is None:
        raise ImageReadError(f"{name}: cannot decode this image (not a PNG, JPEG, BMP or WebP file)")
    kind, width, height = header
    if width * height > cap:
        raise ImageTooLargeError(f"{name}: {kind} of {width}x{height} = {width * height:,} pixels is over the "
                                 f"limit of {cap:,} (ptanet.preprocess.MAX_PIXELS); not decoded")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None:
            raise ImageReadError(f"{name}: OpenCV cannot decode this image (corrupt or not an image)")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    except cv2.error as exc:  # e.g. beyond OpenCV's own limit of 2^30 pixels
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(f"{name}: OpenCV cannot decode this image ({reason})") from None


def _clamp_box(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Clip a pixel box to the image; parts outside the image are cut off, not shifted in."""
    x1, y1 = min(max(x, 0), width), min(max(y, 0), height)
    x2, y2 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    if x2 <= x1 or y2 <= y1:
        raise EmptyBoxError(
            f"face box (x={x}, y={y}, w={w}, h={h}) px has zero size inside the {width}x{height} image"
        )
    return x1, y1, x2 - x1, y2 - y1


class NoFaceError(ValueError):
    """The detector found no face in an image."""


def box_file_of(image_path: str | os.PathLike) -> str:
    """``dir/000001.jpg`` -> ``dir/000001_BB.txt``, where CelebA-Spoof keeps an image's face box."""
    return os.path.splitext(os.fspath(image_path))[0] + BOX_SUFFIX


def parse_box_file(path: str) -> tuple[tuple[float, float, float, float] | None, str, str]:
    """Read a `x y w h score` box file. Returns (box224, "", "") or (None, reason, detail)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None, Reason.BOX_MISSING, path
    except OSError as exc:
        return None, Reason.BOX_UNPARSABLE, f"{path}: {exc}"
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None, Reason.BOX_EMPTY, path
    fields = lines[0].replace(",", " ").split()
    try:
        values = [float(v) for v in fields[:4]]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None, Reason.BOX_UNPARSABLE, f"{path}: {lines[0].strip()[:80]!r}"
    x, y, w, h = values
    if min(values) < 0:
        return None, Reason.BOX_NEGATIVE, f"{path}: {lines[0].strip()[:80]!r}"
    if w <= 0 or h <= 0:
        return None, Reason.BOX_ZERO, f"{path}: {lines[0].strip()[:80]!r}"
    return (x, y, w, h), "", ""




@dataclass(frozen=True)
class Preprocess:
    """Face crop + resize + normalisation settings; stored in every checkpoint and every crop cache."""

    size: int = 128  # paper: faces resized to 128x128
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per channel, in the order of `color`
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    box_frame: int = 224  # CelebA-Spoof boxes live in a 224x224 frame of the image
    color: str = "RGB"  # channel order the network sees: "RGB" (paper) or "BGR"
    # The face box is enlarged this many times about its centre before cropping, so the network also
    # sees what surrounds the face (hair, background, a photo's edge). 1.0 is the paper's tight crop.
    box_scale: float = 1.0

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; normalise so equality and hashing keep working.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"Preprocess.size must be a positive int, got {self.size!r}")
        if not isinstance(self.box_frame, int) or self.box_frame <= 0:
            raise ValueError(f"Preprocess.box_frame must be a positive int, got {self.box_frame!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"Preprocess.mean and .std need 3 values each, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"Preprocess.std must be positive, got {self.std}")
        object.__setattr__(self, "box_scale", float(self.box_scale))
        if not self.box_scale > 0:
            raise ValueError(f"Preprocess.box_scale must be positive, got {self.box_scale!r}")
        if self.color not in ("RGB", "BGR"):
            raise ValueError(f"Preprocess.color must be 'RGB' or 'BGR', got {self.color!r}")

    # --- storage ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, as stored in checkpoints and cache metadata."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Rebuild from `to_dict()` output. Unknown keys are an error (a newer or foreign format), missing
        keys take the defaults (an older checkpoint written before a setting existed)."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess settings must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocess setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    # --- geometry -----------------------------------------------------------------------------
    def box_to_pixels(self, box224: tuple[float, float, float, float], width: int,
                      height: int) -> tuple[int, int, int, int]:
        """Scale a box from the `box_frame` x `box_frame` frame to pixels of a width x height image.

        Uses CelebA-Spoof's own formula (`x1 = int(x * W / 224)`, ...) so crops match the data set's
        intent, then clamps to the image. Raises EmptyBoxError when nothing of the box is left.
        """
        x, y, w, h = box224
        sx, sy = width / self.box_frame, height / self.box_frame
        return _clamp_box(int(x * sx), int(y * sy), int(w * sx), int(h * sy), width, height)

    def region(self, box_px: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
        """The pixels cropped for a face box: the box enlarged `box_scale` times about its centre,
        then clamped to the image (a face at the border gets less context, not a shifted one)."""
        x, y, w, h = (int(v) for v in box_px)
        if self.box_scale != 1.0:  # skipped at 1.0 so that the paper's crop stays bit for bit the same
            new_w, new_h = round(w * self.box_scale), round(h * self.box_scale)
            x, y, w, h = round(x + (w - new_w) / 2), round(y + (h - new_h) / 2), new_w, new_h
        return _clamp_box(x, y, w, h, width, height)

    def crop(self, image_rgb: np.ndarray, box224: tuple[float, float, float, float] | None = None,
             box_px: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Cut the face out of an RGB uint8 image and resize it to size x size (uint8).

        Give the box either in the 224 frame (`box224`, CelebA-Spoof) or in pixels (`box_px`, a
        detector); with neither, the whole image is the face. Either box is enlarged by `box_scale`
        (`region`); the whole image is not. The crop is stretched to a square, as in the paper.
        INTER_AREA when shrinking avoids aliasing; INTER_LINEAR when enlarging.
        """
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"crop expects an HxWx3 uint8 image, got shape {image_rgb.shape} "
                             f"dtype {image_rgb.dtype}")
        if box224 is not None and box_px is not None:
            raise ValueError("give box224 or box_px, not both")
        height, width = image_rgb.shape[:2]
        if box224 is not None:
            x, y, w, h = self.region(self.box_to_pixels(box224, width, height), width, height)
        elif box_px is not None:
            x, y, w, h = self.region(box_px, width, height)
        else:
            x, y, w, h = 0, 0, width, height
        face = image_rgb[y:y + h, x:x + w]
        if w == self.size and h == self.size:
            return np.ascontiguousarray(face)
        shrinking = w >= self.size and h >= self.size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(face, (self.size, self.size), interpolation=interpolation)

    # --- tensors ------------------------------------------------------------------------------
    def normalize(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 RGB crops (H,W,3) or (N,H,W,3) -> float tensor (3,H,W) or (N,3,H,W), mean/std scaled,
        in the channel order of `color`."""
        if crops.dtype != np.uint8 or crops.ndim not in (3, 4) or crops.shape[-1] != 3:
            raise ValueError(f"normalize expects uint8 (H,W,3) or (N,H,W,3), got shape {crops.shape} "
                             f"dtype {crops.dtype}")
        # numpy, not torch: per-sample calls in DataLoader workers are ~5x faster without torch's
        # per-op dispatch and intra-op threading (which also fights with other processes for cores).
        x = crops[..., ::-1] if self.color == "BGR" else crops
        scale = 1.0 / (255.0 * np.asarray(self.std, dtype=np.float32))
        offset = -np.asarray(self.mean, dtype=np.float32) / np.asarray(self.std, dtype=np.float32)
        x = x.astype(np.float32) * scale + offset
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def choose_box(preprocess: Preprocess, image_rgb: np.ndarray, box224: tuple[float, float, float, float] | None = None,
               detector: Detector | None = None) -> tuple[Box | None, str]:
    """Which face box an image is cropped with, and where it came from: the given box in the 224 frame
    (``"box"``: a dataset's box file); else the largest face ``detector`` finds (``"detector"``; none:
    NoFaceError); else the whole image (``None, "image"``). Pass the result to ``preprocess.crop(image,
    box_px=...)``. One rule for the cache, the readers and prediction, so a model is run on the crops
    it was trained on.
    """
    height, width = image_rgb.shape[:2]
    if box224 is not None:
        return preprocess.box_to_pixels(box224, width, height), "box"
    if detector is not None:
        box = detector(image_rgb)
        if box is None:
            raise NoFaceError("no face detected")
        return box, "detector"
    return None, "image"
