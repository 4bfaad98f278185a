"""Embedded default data set: a synthetic live/spoof face set in the CelebA-Spoof layout.

``write_synth(out_dir)`` draws faces procedurally (numpy + OpenCV) and writes::

    OUT/Data/{train,test}/<subject>/{live,spoof}/<NNNNNN>.jpg
    OUT/Data/{train,test}/<subject>/{live,spoof}/<NNNNNN>_BB.txt   "x y w h score" in a 224x224 frame
    OUT/metas/intra_test/{train,test}_label.json                    {"Data/...jpg": [44 ints]}
    OUT/metas/intra_test/{train,test}_label.txt                     "Data/...jpg 0|1"
    OUT/synth_info.json                                             generator parameters

so the CelebA-Spoof reader serves it unchanged.  Label vector as in CelebA-Spoof: ``[0:40]`` face
attributes (all 0 here), ``[40]`` spoof type (0 live, 1 Photo, 3 A4, 7 PC, 8 Pad, 9 Phone),
``[41]`` illumination (0 live, else 1..4), ``[42]`` environment (0 live, else 1..2), ``[43]`` 0 live /
1 spoof.

Live images: a drawn face (head, hair, ears, eyes, brows, nose, mouth, neck, shoulders; optional
glasses/beard) with per-subject identity parameters and per-image pose, lighting, background and
camera noise/blur.  Spoof images: a drawn photo of the same subject shown to the camera as

* a print (Photo/A4): reduced gamut and contrast, halftone dot screen, paper texture and white
  border, slight bend with shading, optionally a holding thumb, then re-captured;
* a replay (PC/Pad/Phone): screen pixel grid with RGB sub-pixel stripes (moire after the camera
  resamples it), display gamma/tint, glare, bezel, then re-captured.

Every strength is random (some attacks are subtle), so the task is learnable but not trivial; the
cues live inside the face box too, not only at the paper/screen edge.

Deterministic: each image gets its own RNG from ``(seed, image index)``, so the bytes do not depend
on the worker count; OpenCV's JPEG encoder is deterministic.  The set is written to a temporary
sibling directory and renamed into place at the end, so an interrupted run never leaves a set that
looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ptanet.data.workers import pool_context

__all__ = [
    "SynthSummary",
    "write_synth",
    "ensure_synth",
    "render_image",
    "SPOOF_PRINT",
    "SPOOF_REPLAY",
]

FORMAT_VERSION = 1
BOX_FRAME = 224  # CelebA-Spoof *_BB.txt boxes are given in a 224x224 frame
JPEG_QUALITY = 92
SPOOF_PRINT = (1, 3)  # Photo, A4
SPOOF_REPLAY = (7, 8, 9)  # PC, Pad, Phone
SPLITS = ("train", "test")

# RGB skin tones from light to dark (stored here as RGB, converted to BGR when used).
_SKIN_RGB = np.array(
    [[255, 226, 204], [241, 194, 167], [226, 175, 140], [198, 136, 100],
     [161, 108, 76], [121, 80, 56], [88, 58, 40]], np.float32) / 255.0
_HAIR_RGB = np.array(
    [[28, 24, 22], [58, 40, 30], [100, 68, 44], [196, 164, 108], [150, 72, 40],
     [165, 160, 155], [45, 35, 30]], np.float32) / 255.0
_IRIS_RGB = np.array([[80, 50, 30], [60, 100, 150], [70, 110, 70], [40, 30, 25]],
                     np.float32) / 255.0


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


@dataclass
class SynthSummary:
    """What :func:`write_synth` wrote: counts per split/label, spoof types, time."""

    out_dir: str
    size: int
    seed: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    subjects: dict[str, int] = field(default_factory=dict)
    spoof_types: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 1

    @property
    def n_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_images"] = self.n_images
        return d

    def __str__(self) -> str:
        lines = [f"synthetic CelebA-Spoof-layout set at {self.out_dir}: {self.n_images} images "
                 f"{self.size}x{self.size}, seed {self.seed}, {self.seconds:.1f} s "
                 f"({self.workers} worker{'s' if self.workers != 1 else ''})"]
        for split in SPLITS:
            c = self.counts.get(split, {})
            types = ", ".join(f"type {k}: {v}" for k, v in sorted(
                self.spoof_types.get(split, {}).items(), key=lambda kv: int(kv[0])))
            lines.append(f"  {split:5s}: {self.subjects.get(split, 0):3d} subjects, "
                         f"live {c.get('live', 0):5d}, spoof {c.get('spoof', 0):5d} ({types})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _rgb2bgr(c: np.ndarray) -> np.ndarray:
    return np.asarray(c, np.float32)[..., ::-1].copy()


def _lerp_palette(pal: np.ndarray, t: float) -> np.ndarray:
    t = float(np.clip(t, 0.0, 1.0)) * (len(pal) - 1)
    i = min(int(t), len(pal) - 2)
    f = t - i
    return pal[i] * (1 - f) + pal[i + 1] * f


def _col(c) -> tuple[float, float, float]:
    """float BGR in [0,1] -> cv2 colour tuple on a float canvas."""
    c = np.clip(np.asarray(c, np.float64), 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


def _pt(x: float, y: float, shift: int = 4) -> tuple[int, int]:
    m = 1 << shift
    return (int(round(x * m)), int(round(y * m)))


def _ellipse(img, c, axes, angle, color, thickness=-1, a0=0, a1=360, shift=4):
    m = 1 << shift
    cv2.ellipse(img, _pt(*c, shift), (max(1, int(round(axes[0] * m))),
                                       max(1, int(round(axes[1] * m)))),
                angle, a0, a1, color, thickness, cv2.LINE_AA, shift)


def _smooth_noise(r: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in ~[-1, 1] of shape (h, w)."""
    small = r.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _box_from_mask(mask: np.ndarray, margin: float = 0.04) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask > 0.5)
    h, w = mask.shape
    if len(xs) == 0:  # should not happen; fall back to the centre
        return (w * 0.25, h * 0.25, w * 0.5, h * 0.5)
    x0, x1 = float(xs.min()), float(xs.max() + 1)
    y0, y1 = float(ys.min()), float(ys.max() + 1)
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    x0, y0 = max(0.0, x0 - mx), max(0.0, y0 - my)
    x1, y1 = min(float(w), x1 + mx), min(float(h), y1 + my)
    return (x0, y0, x1 - x0, y1 - y0)


# --------------------------------------------------------------------------------------------
# Identity (per subject) and backgrounds
# --------------------------------------------------------------------------------------------


def _subject_params(seed: int, subject: int) -> dict[str, Any]:
    r = np.random.default_rng([seed, 0x5B1EC7, subject])
    skin = _rgb2bgr(_lerp_palette(_SKIN_RGB, r.beta(1.3, 1.3)) * r.uniform(0.95, 1.05, 3))
    hair = _rgb2bgr(_HAIR_RGB[r.integers(len(_HAIR_RGB))] * r.uniform(0.85, 1.15, 3))
    return {
        "skin": skin,
        "hair": hair,
        "iris": _rgb2bgr(_IRIS_RGB[r.integers(len(_IRIS_RGB))]),
        "lip": np.clip(skin * np.array([0.62, 0.55, 0.95], np.float32) * r.uniform(0.85, 1.1), 0, 1),
        "shirt": r.uniform(0.05, 0.95, 3).astype(np.float32),
        "face_w": r.uniform(0.19, 0.23),
        "aspect": r.uniform(1.18, 1.42),
        "hair_style": int(r.choice(4, p=[0.45, 0.3, 0.1, 0.15])),  # short, long, bald, curly
        "hairline": r.uniform(0.32, 0.55),
        "fringe": r.uniform(-0.08, 0.15),
        "part": r.uniform(-0.6, 0.6),
        "eye_y": r.uniform(0.02, 0.14),
        "eye_sep": r.uniform(0.36, 0.46),
        "eye_w": r.uniform(0.16, 0.22),
        "eye_h": r.uniform(0.35, 0.55),
        "brow_th": r.uniform(0.035, 0.08),
        "brow_tilt": r.uniform(-0.08, 0.1),
        "brow_gap": r.uniform(0.16, 0.26),
        "nose_len": r.uniform(0.28, 0.42),
        "nose_w": r.uniform(0.1, 0.17),
        "mouth_y": r.uniform(0.5, 0.62),
        "mouth_w": r.uniform(0.26, 0.4),
        "lip_h": r.uniform(0.05, 0.1),
        "glasses": bool(r.random() < 0.2),
        "beard": bool(r.random() < 0.15),
        "ear": r.uniform(0.14, 0.2),
    }


def _background(r: np.random.Generator, W_out: int, outdoor: bool) -> np.ndarray:
    """A random scene behind the subject (float32 BGR, W_out x W_out; drawn at half size)."""
    W = max(32, W_out // 2)
    yy, xx = np.ogrid[0:W, 0:W]
    yy = yy.astype(np.float32) / W
    xx = xx.astype(np.float32) / W
    if outdoor:
        top = np.array([r.uniform(0.7, 1.0), r.uniform(0.55, 0.85), r.uniform(0.35, 0.7)], np.float32)
        bot = np.array([r.uniform(0.1, 0.4), r.uniform(0.3, 0.6), r.uniform(0.15, 0.4)], np.float32)
        t = np.clip((yy - np.float32(r.uniform(0.3, 0.7))) * np.float32(r.uniform(2, 6)) + 0.5, 0, 1)
        t = np.broadcast_to(t, (W, W))[..., None]
    else:
        top = r.uniform(0.15, 0.95, 3).astype(np.float32)
        bot = np.clip(top * r.uniform(0.5, 1.2, 3), 0, 1).astype(np.float32)
        th = r.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (np.float32(np.cos(th)) * (xx - 0.5) + np.float32(np.sin(th)) * (yy - 0.5))
                    * np.float32(r.uniform(0.5, 1.5)), 0, 1)[..., None]
    img = (top * (1 - t) + bot * t).astype(np.float32)
    img = np.ascontiguousarray(img)
    for _ in range(int(r.integers(0, 7))):  # furniture, windows, plants, posters...
        c = _col(r.uniform(0.05, 0.95, 3) if not outdoor else
                 np.array([r.uniform(0.05, 0.4), r.uniform(0.25, 0.7), r.uniform(0.05, 0.5)]))
        kind = r.integers(3)
        if kind == 0:
            x0, y0 = r.uniform(-0.2, 1.0, 2) * W
            x1, y1 = x0 + r.uniform(0.1, 0.7) * W, y0 + r.uniform(0.1, 0.9) * W
            cv2.rectangle(img, _pt(x0, y0), _pt(x1, y1), c, -1, cv2.LINE_AA, 4)
        elif kind == 1:
            _ellipse(img, r.uniform(0, 1, 2) * W, r.uniform(0.03, 0.25, 2) * W, r.uniform(0, 180), c)
        else:
            cv2.line(img, _pt(*(r.uniform(0, 1, 2) * W)), _pt(*(r.uniform(0, 1, 2) * W)), c,
                     int(r.integers(1, max(2, W // 30))), cv2.LINE_AA, 4)
    sig = r.uniform(0.5, 6.0) * W / 384.0 + 0.3  # depth of field
    img = cv2.GaussianBlur(img, (0, 0), sig)
    img *= 1.0 + r.uniform(0.03, 0.15) * _smooth_noise(r, W, W, int(r.integers(4, 16)))[..., None]
    if r.random() < 0.35:  # fine texture (wallpaper, foliage, fabric)
        tex = cv2.GaussianBlur(r.standard_normal((W, W), dtype=np.float32), (0, 0), r.uniform(0.5, 1.5))
        img += r.uniform(0.01, 0.06) * tex[..., None]
    img = np.clip(img, 0, 1)
    return cv2.resize(img, (W_out, W_out), interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------------------------
# Face drawing
# --------------------------------------------------------------------------------------------


def _draw_face(p: dict[str, Any], r: np.random.Generator, S: int, ss: int = 1,
               scale: tuple[float, float] = (0.88, 1.12),
               bg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw subject ``p`` with a random pose/expression/lighting on a random background.

    Returns ``(image float32 BGR SxS in [0,1], face mask float32 SxS)``; the mask is the head
    (skin ellipse) the CelebA-style face box is taken from.
    """
    W = S * ss
    outdoor = bool(r.random() < 0.35)
    if bg is None:
        bg = _background(r, W, outdoor)
    sc = r.uniform(*scale)
    cx = W * (0.5 + r.uniform(-0.06, 0.06))
    cy = W * (0.47 + r.uniform(-0.05, 0.05))
    roll = r.uniform(-13, 13)
    yaw = r.uniform(-1, 1) * 0.22
    a = p["face_w"] * W * sc
    b = a * p["aspect"]
    skin = p["skin"] * r.uniform(0.95, 1.05)
    hair = p["hair"]
    dark_skin = skin * 0.8
    fx = cx + yaw * a * 0.45  # features shift with yaw

    layer = np.zeros((W, W, 3), np.float32)
    alpha = np.zeros((W, W), np.float32)
    head = np.zeros((W, W), np.float32)

    def fill_ellipse(c, axes, color, ang=0.0, a0=0, a1=360):
        _ellipse(layer, c, axes, ang, _col(color), -1, a0, a1)
        _ellipse(alpha, c, axes, ang, 1.0, -1, a0, a1)

    def fill_poly(pts, color):
        pts = np.round(np.asarray(pts) * 16).astype(np.int32)
        cv2.fillPoly(layer, [pts], _col(color), cv2.LINE_AA, 4)
        cv2.fillPoly(alpha, [pts], 1.0, cv2.LINE_AA, 4)

    style = p["hair_style"]
    if style == 1:  # long hair behind the head
        fill_ellipse((cx, cy + 0.3 * b), (1.32 * a, 1.25 * b), hair * 0.9)
    # shoulders, neck
    fill_ellipse((cx, cy + 1.05 * b + 0.85 * a), (2.3 * a, 0.95 * a), p["shirt"])
    fill_poly([(cx - 0.42 * a, cy + 0.4 * b), (cx + 0.42 * a, cy + 0.4 * b),
               (cx + 0.46 * a, cy + 1.12 * b), (cx - 0.46 * a, cy + 1.12 * b)], dark_skin)
    fill_ellipse((cx, cy + 1.1 * b), (0.46 * a, 0.14 * a), dark_skin, a0=0, a1=180)
    if style == 1:
        for sgn in (-1, 1):
            fill_ellipse((cx + sgn * 0.95 * a, cy + 0.75 * b), (0.35 * a, 0.7 * b), hair * 0.95)
    # ears (the far one hides with yaw)
    for sgn in (-1, 1):
        ex = cx + sgn * a * (0.97 - 0.25 * max(0.0, sgn * -yaw) * 4)
        fill_ellipse((ex, cy + 0.05 * b), (p["ear"] * a, p["ear"] * 1.7 * a), skin * 0.9)
    # head
    fill_ellipse((cx, cy), (a, b), skin)
    _ellipse(head, (cx, cy), (a, b), 0, 1.0)
    # shading: darker towards the head outline (fake 3D), slight blush
    y0, y1 = max(0, int(cy - b) - 2), min(W, int(cy + b) + 3)
    x0, x1 = max(0, int(cx - a) - 2), min(W, int(cx + a) + 3)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    hreg = head[y0:y1, x0:x1, None]
    lreg = layer[y0:y1, x0:x1]
    d2 = ((xx - fx) / a) ** 2 + ((yy - cy) / b) ** 2
    shade = 1.0 - 0.28 * np.clip(d2, 0, 1.3) ** 1.6
    lreg *= 1.0 + (shade[..., None] - 1.0) * (hreg > 0)
    if r.random() < 0.6:
        for sgn in (-1, 1):
            blush = np.exp(-(((xx - fx - sgn * 0.5 * a) / (0.2 * a)) ** 2 +
                             ((yy - cy - 0.25 * b) / (0.15 * b)) ** 2))[..., None] * hreg
            lreg[..., 2:3] += 0.06 * blush
            lreg[..., :2] -= 0.02 * blush
    # skin texture
    lreg += (0.025 * _smooth_noise(r, y1 - y0, x1 - x0, 12))[..., None] * hreg

    # hair on top of the head
    if style != 2:
        hl = p["hairline"]
        top = cy - 1.07 * b
        t = np.linspace(-1, 1, 41)
        xs = cx + t * 1.06 * a
        ylow = cy - hl * b - p["fringe"] * b * (1 - (t - p["part"] * 0.3) ** 2) + 0.55 * b * t ** 6
        arc = np.linspace(np.pi, 2 * np.pi, 41)
        xs_top = cx + 1.06 * a * np.cos(arc)
        ys_top = np.minimum(cy - 0.25 * b, cy + (1.07 * b) * np.sin(arc))
        poly = list(zip(xs_top, ys_top)) + list(zip(xs[::-1], ylow[::-1]))
        fill_poly(poly, hair)
        if style == 3:  # curly: bumps along the outline
            for th in np.linspace(np.pi * 0.95, np.pi * 2.05, 13):
                rr = r.uniform(0.17, 0.25) * a
                fill_ellipse((cx + 1.02 * a * np.cos(th), cy + 1.0 * b * np.sin(th) + 0.05 * b),
                             (rr, rr), hair * r.uniform(0.85, 1.1))
        # a few strands for texture
        for _ in range(12):
            x0 = cx + r.uniform(-0.8, 0.8) * a
            y0 = top + r.uniform(0.05, 0.4) * b
            cv2.line(layer, _pt(x0, y0), _pt(x0 + r.uniform(-0.3, 0.3) * a, y0 + r.uniform(0.1, 0.3) * b),
                     _col(hair * r.uniform(0.7, 1.3)), max(1, W // 200), cv2.LINE_AA, 4)
    else:
        fill_ellipse((cx, cy - 0.7 * b), (0.7 * a, 0.3 * b), hair, a0=180, a1=360)

    # beard
    if p["beard"]:
        t = np.linspace(0, np.pi, 31)
        outer = [(cx + 0.98 * a * np.cos(tt), cy + 0.15 * b + 0.88 * b * np.sin(tt)) for tt in t]
        inner = [(fx + 0.5 * a * np.cos(tt), cy + 0.42 * b + 0.25 * b * np.sin(tt)) for tt in t[::-1]]
        pts = np.round(np.asarray(outer + inner) * 16).astype(np.int32)
        ov = layer.copy()
        cv2.fillPoly(ov, [pts], _col(hair), cv2.LINE_AA, 4)
        layer = layer * 0.3 + ov * 0.7

    # eyes
    eye_open = r.uniform(0.6, 1.15) if r.random() > 0.05 else 0.15
    ey = cy - p["eye_y"] * b
    ew, eh = p["eye_w"] * a, p["eye_w"] * a * p["eye_h"] * eye_open
    gaze = r.uniform(-0.3, 0.3, 2)
    for sgn in (-1, 1):
        ex = fx + sgn * p["eye_sep"] * a * (1 - 0.3 * sgn * yaw)
        _ellipse(layer, (ex, ey), (ew * 1.25, ew * 0.75), 0, _col(skin * 0.82))  # socket
        _ellipse(layer, (ex, ey), (ew, eh), 0, _col(np.array([0.93, 0.94, 0.95]) * r.uniform(0.9, 1.0)))
        ir = min(0.42 * ew, eh * 1.2)
        ix, iy = ex + gaze[0] * ew * 0.4, ey + gaze[1] * eh * 0.3
        _ellipse(layer, (ix, iy), (ir, min(ir, eh)), 0, _col(p["iris"]))
        _ellipse(layer, (ix, iy), (ir * 0.45, min(ir * 0.45, eh)), 0, _col((0.03, 0.03, 0.03)))
        _ellipse(layer, (ix + ir * 0.3, iy - ir * 0.3), (ir * 0.18, ir * 0.18), 0, _col((1, 1, 1)))
        _ellipse(layer, (ex, ey), (ew, eh), 0, _col(skin * 0.35), max(1, W // 160), 180, 360)
        # brow
        by = ey - p["brow_gap"] * b
        x_in, x_out = ex - sgn * 0.9 * ew, ex + sgn * 1.2 * ew
        pts = np.array([(x_in, by + p["brow_tilt"] * b * 0.5), (ex, by - 0.05 * b),
                        (x_out, by + 0.03 * b - p["brow_tilt"] * b * 0.3)])
        cv2.polylines(layer, [np.round(pts * 16).astype(np.int32)], False, _col(hair * 0.9),
                      max(1, int(p["brow_th"] * a)), cv2.LINE_AA, 4)
    # nose
    ny0, ny1 = ey + 0.05 * b, ey + p["nose_len"] * b * 1.6
    nx = fx + yaw * 0.3 * a
    cv2.line(layer, _pt(fx + 0.05 * a * np.sign(yaw + 1e-6), ny0), _pt(nx + 0.06 * a, ny1 - 0.05 * b),
             _col(skin * 0.72), max(1, W // 180), cv2.LINE_AA, 4)
    _ellipse(layer, (nx, ny1 - 0.02 * b), (p["nose_w"] * a, 0.06 * b), 0, _col(skin * 0.85))
    for sgn in (-1, 1):
        _ellipse(layer, (nx + sgn * 0.5 * p["nose_w"] * a, ny1), (0.04 * a, 0.025 * a), 0,
                 _col(skin * 0.4))
    # mouth
    my = cy + p["mouth_y"] * b
    mw = p["mouth_w"] * a * r.uniform(0.9, 1.15)
    lh = p["lip_h"] * b
    smile = r.uniform(-0.3, 1.0)
    opened = r.random() < 0.3
    if opened:
        _ellipse(layer, (fx, my), (mw, lh * 1.6), 0, _col(p["lip"]))
        _ellipse(layer, (fx, my + 0.1 * lh), (mw * 0.85, lh * 1.0), 0, _col((0.1, 0.08, 0.2)))
        _ellipse(layer, (fx, my - 0.5 * lh), (mw * 0.7, lh * 0.35), 0, _col((0.9, 0.93, 0.95)))
    else:
        _ellipse(layer, (fx, my - 0.35 * lh), (mw, lh * 0.7), 0, _col(p["lip"] * 0.92), -1, 180, 360)
        _ellipse(layer, (fx, my - 0.2 * lh), (mw * 0.95, lh), 0, _col(p["lip"]), -1, 0, 180)
        _ellipse(layer, (fx, my - 0.3 * lh - smile * 0.3 * lh), (mw, max(1.0, smile * 0.6 * lh)), 0,
                 _col(p["lip"] * 0.45), max(1, W // 200), 0, 180)
    # glasses
    if p["glasses"]:
        gc = _col(np.array([0.05, 0.05, 0.05]) + r.uniform(0, 0.3))
        th = max(1, W // 130)
        for sgn in (-1, 1):
            ex = fx + sgn * p["eye_sep"] * a
            _ellipse(layer, (ex, ey), (ew * 1.5, ew * 1.1), 0, gc, th)
            _ellipse(alpha, (ex, ey), (ew * 1.5, ew * 1.1), 0, 1.0, th)
        cv2.line(layer, _pt(fx - p["eye_sep"] * a + ew * 1.5, ey), _pt(fx + p["eye_sep"] * a - ew * 1.5, ey),
                 gc, th, cv2.LINE_AA, 4)

    # rotate the subject (roll) and composite
    M = cv2.getRotationMatrix2D((cx, cy + 0.5 * b), roll, 1.0)
    layer = cv2.warpAffine(layer, M, (W, W), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(alpha, M, (W, W), flags=cv2.INTER_LINEAR)
    head = cv2.warpAffine(head, M, (W, W), flags=cv2.INTER_LINEAR)
    a3 = alpha[..., None]
    img = bg + (layer - bg) * a3
    if ss != 1:
        img = cv2.resize(img, (S, S), interpolation=cv2.INTER_AREA)
        head = cv2.resize(head, (S, S), interpolation=cv2.INTER_AREA)
    # lighting: directional gradient, exposure, white balance
    gain = _light(r, S, (cx / ss, cy / ss), 0.45) * (
        np.float32(r.uniform(0.75, 1.2)) * r.uniform(0.9, 1.1, 3).astype(np.float32))
    img = np.clip(img * gain, 0, 1)
    return img, head


def _light(r: np.random.Generator, W: int, c: tuple[float, float], kmax: float) -> np.ndarray:
    """Directional lighting gradient (W, W, 1) float32."""
    th = r.uniform(0, 2 * np.pi)
    k = r.uniform(0.0, kmax) / (W * 0.5)
    yy, xx = np.ogrid[0:W, 0:W]
    gx = (1.0 + k * np.cos(th) * (xx - c[0])).astype(np.float32)
    gy = (k * np.sin(th) * (yy - c[1])).astype(np.float32)
    return (gx + gy)[..., None]


def _camera(img: np.ndarray, r: np.random.Generator, blur: tuple[float, float],
            noise: tuple[float, float]) -> np.ndarray:
    """Defocus blur + signal-dependent sensor noise + mild chroma noise (float in, float out)."""
    s = r.uniform(*blur)
    if s > 0.2:
        img = cv2.GaussianBlur(img, (0, 0), s)
    read = r.uniform(*noise) / 255.0
    shot = r.uniform(0.0, 2.0) * read
    sd = np.sqrt(read ** 2 + shot * np.clip(img, 0, 1) * 0.05)
    n = r.standard_normal(img.shape, dtype=np.float32)
    lum = r.standard_normal(img.shape[:2], dtype=np.float32)[..., None]
    img = img + sd * (0.5 * n + 0.85 * lum)
    return np.clip(img, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------


def _homography(r: np.random.Generator, med_w: float, med_h: float, anchor: tuple[float, float],
                target: tuple[float, float], scale: float, persp: float) -> np.ndarray:
    """Medium coords -> camera coords: similarity (anchor->target) plus a mild perspective tilt."""
    ang = math.radians(r.uniform(-14, 14))
    c, s = math.cos(ang) * scale, math.sin(ang) * scale
    A = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float64)
    ax, ay = anchor
    tx, ty = target
    T0 = np.array([[1, 0, -ax], [0, 1, -ay], [0, 0, 1]], np.float64)
    T1 = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)
    L = max(med_w, med_h)
    P = np.array([[1, 0, 0], [0, 1, 0],
                  [r.uniform(-1, 1) * persp / L, r.uniform(-1, 1) * persp / L, 1]], np.float64)
    return T1 @ A @ P @ T0


def _inverse_map(H: np.ndarray, W: int) -> tuple[np.ndarray, np.ndarray]:
    Hi = np.linalg.inv(H)
    # pixel centres
    Y, X = np.ogrid[0:W, 0:W]
    X, Y = X + 0.5, Y + 0.5
    den = Hi[2, 0] * X + Hi[2, 1] * Y + Hi[2, 2]
    u = (Hi[0, 0] * X + Hi[0, 1] * Y + Hi[0, 2]) / den
    v = (Hi[1, 0] * X + Hi[1, 1] * Y + Hi[1, 2]) / den
    return u.astype(np.float32), v.astype(np.float32)


def _sample(img: np.ndarray, u: np.ndarray, v: np.ndarray, border=0.0) -> np.ndarray:
    return cv2.remap(img, u - 0.5, v - 0.5, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=border)


def _hand(canvas: np.ndarray, mask: np.ndarray, r: np.random.Generator, H: np.ndarray,
          med_w: float, med_h: float, skin: np.ndarray) -> None:
    """A thumb holding the medium at one of its edges (drawn in camera space, in place)."""
    side = r.integers(4)
    t = r.uniform(0.2, 0.8)
    pts = {0: (t * med_w, med_h), 1: (t * med_w, 0), 2: (0, t * med_h), 3: (med_w, t * med_h)}[side]
    q = H @ np.array([pts[0], pts[1], 1.0])
    x, y = q[0] / q[2], q[1] / q[2]
    W = canvas.shape[0]
    L = W * r.uniform(0.07, 0.12)
    ang = r.uniform(0, 180)
    _ellipse(canvas, (x, y), (L * 0.55, L), ang, _col(skin * r.uniform(0.8, 1.0)))
    _ellipse(mask, (x, y), (L * 0.55, L), ang, 1.0)


def _attack(p: dict[str, Any], r: np.random.Generator, S: int, spoof_type: int,
            outdoor: bool) -> tuple[np.ndarray, np.ndarray]:
    """A spoof: the subject's photo shown as a print or on a screen, re-captured by the camera."""
    W = int(round(S * 1.5))  # re-capture canvas, supersampled: the camera integrates the pattern
    ss = W / S
    is_print = spoof_type in SPOOF_PRINT
    # the photo that is shown: the same subject, another pose/background/camera
    Sc = S
    photo, pmask = _draw_face(p, r, Sc, scale=(0.85, 1.15))
    photo = _camera(photo, r, blur=(0.0, 0.7), noise=(0.5, 3.0))
    scene = _background(r, W, outdoor)

    if is_print:
        # printer: gamut/contrast loss, warm paper, raised blacks, slight ink spread
        strength = r.beta(2.0, 2.0)
        gray = photo.mean(axis=2, keepdims=True)
        sat = 1.0 - strength * r.uniform(0.2, 0.6)
        con = 1.0 - strength * r.uniform(0.15, 0.45)
        paper = np.array([r.uniform(0.86, 0.95), r.uniform(0.9, 0.98), r.uniform(0.92, 1.0)], np.float32)
        c = gray + (photo - gray) * sat
        c = 0.5 + (c - 0.5) * con
        black = strength * r.uniform(0.03, 0.12)
        c = black + c * (paper - black)
        c = cv2.GaussianBlur(np.clip(c, 0, 1).astype(np.float32), (0, 0), r.uniform(0.2, 0.8))
        # paper: photo plus a white border (random per side), fibre texture
        m = [int(Sc * r.uniform(0.0, 0.25)) for _ in range(4)]  # left, top, right, bottom
        if spoof_type == 1 and r.random() < 0.5:
            m = [0, 0, 0, 0]  # photo paper: borderless
        mw, mh = Sc + m[0] + m[2], Sc + m[1] + m[3]
        med = np.ones((mh, mw, 3), np.float32) * paper
        med[m[1]:m[1] + Sc, m[0]:m[0] + Sc] = c
        fibre = cv2.GaussianBlur(r.standard_normal((mh, mw), dtype=np.float32), (0, 0), 0.8)
        med *= 1.0 + r.uniform(0.01, 0.06) * strength * fibre[..., None]
        fmask = np.zeros((mh, mw), np.float32)
        fmask[m[1]:m[1] + Sc, m[0]:m[0] + Sc] = pmask
        anchor_off = (m[0], m[1])
        persp = r.uniform(0.0, 0.35)
    else:
        strength = r.beta(2.0, 2.0)
        # display: gamma, gain, tint; bezel around the active area
        gamma = r.uniform(0.75, 1.3)
        c = np.clip(photo, 0, 1) ** gamma
        tint = np.array([1 + r.uniform(0, 0.15), 1.0, 1 - r.uniform(0, 0.1)], np.float32)
        c = c * r.uniform(0.9, 1.2) * (tint if r.random() < 0.6 else 1.0)
        sat = 1.0 + r.uniform(-0.2, 0.35) * strength
        gray = c.mean(axis=2, keepdims=True)
        c = np.clip(gray + (c - gray) * sat, 0, 1).astype(np.float32)
        bz = {7: (0.02, 0.06), 8: (0.05, 0.12), 9: (0.06, 0.16)}[spoof_type]
        bw = int(Sc * r.uniform(*bz))
        mw = mh = Sc + 2 * bw
        bez = np.array([r.uniform(0.02, 0.12)] * 3, np.float32) * r.uniform(0.8, 1.2, 3)
        med = np.ones((mh, mw, 3), np.float32) * bez.astype(np.float32)
        med[bw:bw + Sc, bw:bw + Sc] = c
        fmask = np.zeros((mh, mw), np.float32)
        fmask[bw:bw + Sc, bw:bw + Sc] = pmask
        anchor_off = (bw, bw)
        persp = r.uniform(0.0, 0.25)

    # place the medium so the shown face lands near the frame centre at a "live-like" size
    ys, xs = np.nonzero(pmask > 0.5)
    fcx = anchor_off[0] + (xs.mean() if len(xs) else Sc / 2)
    fcy = anchor_off[1] + (ys.mean() if len(ys) else Sc / 2)
    scale = ss * r.uniform(0.8, 1.3)
    target = (W * (0.5 + r.uniform(-0.06, 0.06)), W * (0.48 + r.uniform(-0.05, 0.05)))
    H = _homography(r, mw, mh, (fcx, fcy), target, scale, persp)
    u, v = _inverse_map(H, W)
    bend = 0.0
    if is_print:  # paper bend: curved edges + shading across the fold
        bend = r.uniform(-1, 1) * r.uniform(0.0, 0.06)
        un = (u - mw / 2) / (mw / 2)
        v = v + (bend * mh * un ** 2).astype(np.float32)

    inside = ((u >= 0) & (u < mw) & (v >= 0) & (v < mh)).astype(np.float32)[..., None]
    face = _sample(fmask, u, v)
    glare = None  # (amplitude, centre, axes, angle) of a highlight, added at output resolution
    if is_print:
        img = _sample(med, u, v)
        # halftone dot screen, evaluated at the exact medium position -> survives re-sampling
        hs = np.float32(r.beta(2.0, 2.0) * strength ** 0.5)
        period = r.uniform(1.2, 3.5) / scale * ss  # in medium px, so ~1.2-3.5 camera px at S
        ang = r.uniform(0, np.pi / 2)
        k = np.float32(2 * np.pi / period)
        ca, sa = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        thr = 0.5 + 0.25 * (np.cos((u * ca + v * sa) * k) + np.cos((v * ca - u * sa) * k))
        ink = 1.0 - img / paper
        dots = np.clip((ink - thr[..., None]) * 3.0 + 0.5, 0.0, 1.0)
        img += ((1.0 - dots) * paper - img) * hs
        if bend:
            img *= (1.0 - abs(bend) * r.uniform(2, 6) * ((u - mw / 2) / (mw / 2)) ** 2)[..., None]
        if r.random() < 0.3:  # glossy photo paper glint
            glare = (r.uniform(0.05, 0.25), r.uniform(0.2, 0.8, 2), (0.2, 0.12), 0.0)
    else:
        # the screen shows the photo at its own pixel pitch, through RGB sub-pixel stripes
        pitch = r.uniform(0.55, 2.8) / scale * ss  # medium px per screen px (~camera px at S)
        fu, fv = u / pitch, v / pitch
        iu, iv = np.floor(fu), np.floor(fv)
        img = _sample(med, (iu + 0.5) * pitch, (iv + 0.5) * pitch)
        sub = np.minimum(((fu - iu) * 3).astype(np.int8), 2)  # 0 R, 1 G, 2 B
        dark = np.float32(r.uniform(0.0, 0.35))
        on = sub[..., None] == np.array([2, 1, 0], np.int8)  # BGR channel -> sub-pixel index
        pat = np.where(on, np.float32(1.0), dark)
        pat *= np.where((fv - iv) > r.uniform(0.8, 0.95), dark, np.float32(1.0))[..., None]
        pat /= np.asarray(cv2.mean(pat)[:3], np.float32) + 1e-6
        ms = (0.4 + 0.6 * strength) * r.uniform(0.3, 1.0)
        active = _sample(_active_mask(mh, mw, anchor_off, Sc), u, v)[..., None]
        img *= 1.0 + (pat - 1.0) * (np.float32(ms) * active)
        # ambient reflection lowers contrast; glare: bright elliptical highlight
        refl = np.float32(r.uniform(0.0, 0.15) * strength)
        img *= 1 - refl
        img += refl * scene.mean(axis=(0, 1))
        if r.random() < 0.75:
            glare = (r.uniform(0.1, 0.7) * strength, r.uniform(0.15, 0.85, 2),
                     (r.uniform(0.08, 0.3), r.uniform(0.04, 0.15)), r.uniform(0, 180))

    comp = scene + (img - scene) * inside
    if is_print and r.random() < 0.5:
        thumb = np.zeros((W, W), np.float32)
        _hand(comp, thumb, r, H, mw, mh, p["skin"])
        face *= thumb < 0.5  # an occluding thumb is not face
    comp = cv2.resize(comp, (S, S), interpolation=cv2.INTER_AREA)
    face = cv2.resize(face, (S, S), interpolation=cv2.INTER_AREA)
    if glare is not None:
        amp, (gx, gy), (ax, ay), ga = glare
        cover = cv2.resize(inside[..., 0], (S, S), interpolation=cv2.INTER_AREA)
        Y, X = np.ogrid[0:S, 0:S]
        Y, X = Y.astype(np.float32) / S - gy, X.astype(np.float32) / S - gx
        c, s_ = np.float32(math.cos(math.radians(ga))), np.float32(math.sin(math.radians(ga)))
        g = np.exp(-(((X * c + Y * s_) / ax) ** 2 + ((Y * c - X * s_) / ay) ** 2))
        comp += (np.float32(amp) * g * cover)[..., None]
    # ambient lighting of the re-capture
    gain = _light(r, S, (S / 2, S / 2), 0.3) * (
        np.float32(r.uniform(0.8, 1.15)) * r.uniform(0.93, 1.07, 3).astype(np.float32))
    return np.clip(comp * gain, 0, 1), face



def _active_mask(mh: int, mw: int, off: tuple[int, int], Sc: int) -> np.ndarray:
    m = np.zeros((mh, mw), np.float32)
    m[off[1]:off[1] + Sc, off[0]:off[0] + Sc] = 1.0
    return m


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def render_image(seed: int, index: int, subject: int, spoof_type: int, size: int = 176,
                 illumination: int = 0, environment: int = 0
                 ) -> tuple[np.ndarray, tuple[float, float, float, float], np.ndarray]:
    """Render image ``index`` of a set: ``(uint8 BGR size x size, face box px (x,y,w,h), face mask)``.

    Deterministic in its arguments (its RNG is derived from ``(seed, index)``).  ``spoof_type`` 0
    draws a live face, anything else the corresponding attack.
    """
    r = np.random.default_rng([seed, 0xFACE, index])
    p = _subject_params(seed, subject)
    outdoor = environment == 2 if environment else bool(r.random() < 0.35)
    if spoof_type == 0:
        img, mask = _draw_face(p, r, size)
        img = _camera(img, r, blur=(0.0, 1.1), noise=(0.5, 6.0))
    else:
        img, mask = _attack(p, r, size, spoof_type, outdoor)
        img = _camera(img, r, blur=(0.0, 0.9), noise=(0.5, 6.0))
    if illumination == 4:  # dark: lower exposure, more noise
        img = np.clip(img * 0.65 + r.standard_normal(img.shape).astype(np.float32) * 0.01, 0, 1)
    elif illumination == 2:  # strong light
        img = np.clip(img * 1.15, 0, 1)
    box = _box_from_mask(mask)
    return (img * 255.0 + 0.5).astype(np.uint8), box, mask


def _box224(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    """Pixel box -> integer box in the 224 frame that still covers the pixel box."""
    f = BOX_FRAME / size
    x0, y0 = math.floor(box[0] * f), math.floor(box[1] * f)
    x1 = min(BOX_FRAME, math.ceil((box[0] + box[2]) * f))
    y1 = min(BOX_FRAME, math.ceil((box[1] + box[3]) * f))
    return (max(0, x0), max(0, y0), x1 - max(0, x0), y1 - max(0, y0))


def _work(task: tuple) -> tuple[str, tuple[int, int, int, int]]:
    root, rel, seed, index, subject, spoof_type, size, illum, env = task
    img, box, _ = render_image(seed, index, subject, spoof_type, size, illum, env)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {rel}")
    path = os.path.join(root, rel)
    with open(path, "wb") as f:
        f.write(buf.tobytes())
    b = _box224(box, size)
    r = np.random.default_rng([seed, 0xB0C5, index])
    with open(path[:-4] + "_BB.txt", "w") as f:
        f.write(f"{b[0]} {b[1]} {b[2]} {b[3]} {r.uniform(0.9, 0.9999):.7f}\n")
    return rel, b


def _init_worker() -> None:
    cv2.setNumThreads(1)


# --------------------------------------------------------------------------------------------
# The set
# --------------------------------------------------------------------------------------------


def _plan(seed: int, n_train: int, n_test: int, per_subject: int) -> list[dict[str, Any]]:
    """Every image of the set, in index order: split, subject, label, spoof type, illum, env."""
    r = np.random.default_rng([seed, 0x91A7])
    items: list[dict[str, Any]] = []
    subjects = {"train": list(range(1, n_train + 1)),
                "test": list(range(n_train + 1, n_train + n_test + 1))}
    index = 0
    for split in SPLITS:
        for subj in subjects[split]:
            n_live = per_subject // 2
            labels = [0] * n_live + [1] * (per_subject - n_live)
            if per_subject % 2 and r.random() < 0.5:  # odd count: the extra one either way
                labels = [0] * (per_subject - n_live) + [1] * n_live
            for lab in labels:
                index += 1
                if lab == 0:
                    st, il, en = 0, 0, 0
                else:
                    st = int(r.choice([1, 3, 7, 8, 9], p=[0.25, 0.25, 0.2, 0.15, 0.15]))
                    il = int(r.choice([1, 2, 3, 4], p=[0.55, 0.15, 0.15, 0.15]))
                    en = int(r.choice([1, 2], p=[0.7, 0.3]))
                items.append({"index": index, "split": split, "subject": subj, "label": lab,
                              "spoof_type": st, "illumination": il, "environment": en})
    return items


def _rel(item: dict[str, Any]) -> str:
    kind = "spoof" if item["label"] else "live"
    return f"Data/{item['split']}/{item['subject']}/{kind}/{item['index']:06d}.jpg"


def _label_vec(item: dict[str, Any]) -> list[int]:
    v = [0] * 44
    v[40] = item["spoof_type"]
    v[41] = item["illumination"]
    v[42] = item["environment"]
    v[43] = item["label"]
    return v


def _params(n_train, n_test, per_subject, seed, size) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "generator": "ptanet.data.synth",
            "n_subjects_train": n_train, "n_subjects_test": n_test,
            "images_per_subject": per_subject, "seed": seed, "size": size,
            "jpeg_quality": JPEG_QUALITY}


def write_synth(out_dir: str | os.PathLike, n_subjects_train: int = 24, n_subjects_test: int = 8,
                images_per_subject: int = 80, seed: int = 0, size: int = 176,
                workers: int | None = None, overwrite: bool = False,
                progress: bool = False) -> SynthSummary:
    """Write the synthetic live/spoof set in the CelebA-Spoof layout under ``out_dir``.

    Same arguments -> byte-identical files, whatever ``workers`` is.  ``workers=None`` uses every
    CPU; ``workers=1`` renders in this process.  An existing non-empty ``out_dir`` is an error unless
    ``overwrite``.  The set is built in a temporary sibling directory and renamed into place last.
    """
    if n_subjects_train < 1 or n_subjects_test < 1 or images_per_subject < 2:
        raise ValueError("need >= 1 subject per split and >= 2 images per subject")
    if size < 64:
        raise ValueError("size must be >= 64")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    items = _plan(seed, n_subjects_train, n_subjects_test, images_per_subject)
    for it in items:
        (tmp / _rel(it)).parent.mkdir(parents=True, exist_ok=True)
    tasks = [(str(tmp), _rel(it), seed, it["index"], it["subject"], it["spoof_type"], size,
              it["illumination"], it["environment"]) for it in items]
    n_workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    n_workers = min(n_workers, max(1, len(tasks) // 8))
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(tasks), desc="synth", unit="img")
        except ImportError:
            bar = None
    try:
        if n_workers <= 1:
            for t in tasks:
                _work(t)
                if bar is not None:
                    bar.update(1)
        else:
            with pool_context(__name__).Pool(n_workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(_work, tasks, chunksize=16):
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        # labels last: the set only looks complete once these exist (and after the rename)
        meta = tmp / "metas" / "intra_test"
        meta.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            sel = [it for it in items if it["split"] == split]
            labels = {_rel(it): _label_vec(it) for it in sel}
            (meta / f"{split}_label.json").write_text(
                "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in labels.items())
                + "\n}\n")
            (meta / f"{split}_label.txt").write_text(
                "".join(f"{_rel(it)} {it['label']}\n" for it in sel))
        (tmp / "synth_info.json").write_text(
            json.dumps(_params(n_subjects_train, n_subjects_test, images_per_subject, seed, size),
                       indent=1, sort_keys=True))
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    summary = SynthSummary(out_dir=str(out), size=size, seed=seed, seconds=time.perf_counter() - t0,
                           workers=n_workers)
    for split in SPLITS:
        sel = [it for it in items if it["split"] == split]
        summary.counts[split] = {"live": sum(1 for it in sel if it["label"] == 0),
                                 "spoof": sum(1 for it in sel if it["label"] == 1)}
        summary.subjects[split] = len({it["subject"] for it in sel})
        types: dict[str, int] = {}
        for it in sel:
            if it["label"]:
                types[str(it["spoof_type"])] = types.get(str(it["spoof_type"]), 0) + 1
        summary.spoof_types[split] = types
    return summary


def ensure_synth(out_dir: str | os.PathLike, **kwargs: Any) -> SynthSummary | None:
    """Write the set unless ``out_dir`` already holds a complete one made with the same parameters.

    Returns the summary when it wrote, ``None`` when the existing set was reused.
    """
    out = Path(out_dir)
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(write_synth).parameters.items()
                if v.default is not inspect.Parameter.empty}
    args = {**defaults, **kwargs}
    want = _params(args["n_subjects_train"], args["n_subjects_test"], args["images_per_subject"],
                   args["seed"], args["size"])
    info = out / "synth_info.json"
    complete = info.exists() and all(
        (out / "metas" / "intra_test" / f"{s}_label.json").exists() for s in SPLITS)
    if complete:
        try:
            if json.loads(info.read_text()) == want:
                return None
        except (OSError, ValueError):
            pass
    kwargs = dict(kwargs)
    kwargs["overwrite"] = True
    return write_synth(out, **kwargs)
