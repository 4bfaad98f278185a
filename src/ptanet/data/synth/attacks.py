"""Spoof images: the subject's photo shown as a print or on a screen and re-captured by the camera.

The medium (paper or screen, with the photo on it) is built in its own pixel coordinates, then
mapped into a supersampled camera frame by a homography; the print's halftone and the screen's
sub-pixel grid are evaluated at the exact medium position of every camera pixel, so they alias
(moire) the way a real re-capture does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ptanet.data.synth.faces import Identity, background, camera, cv_color, draw_face, ellipse, light

# CelebA-Spoof spoof-type codes of the attacks drawn here
PHOTO, A4, PC, PAD, PHONE = 1, 3, 7, 8, 9
SPOOF_PRINT = (PHOTO, A4)
SPOOF_REPLAY = (PC, PAD, PHONE)

# range of the bezel width around a screen's active area, as a fraction of the photo size
_BEZEL_WIDTH = {PC: (0.02, 0.06), PAD: (0.05, 0.12), PHONE: (0.06, 0.16)}


@dataclass(frozen=True)
class Medium:
    """A print or a screen showing the photo, in medium pixels (before the re-capture)."""

    image: np.ndarray  # float32 BGR (h, w, 3)
    face: np.ndarray  # the photo's face mask placed on the medium (h, w)
    photo_origin: tuple[int, int]  # (x, y) of the photo's top-left corner on the medium
    strength: float  # 0..1, how strong this attack's cues are
    perspective: float  # largest tilt of the medium towards the camera
    paper: np.ndarray | None  # white of the paper (prints only)


@dataclass(frozen=True)
class Glare:
    """An elliptical highlight on the medium, in fractions of the camera frame."""

    amplitude: float
    centre: np.ndarray  # (x, y)
    axes: tuple[float, float]  # half axes
    angle: float  # degrees


def attack(who: Identity, r: np.random.Generator, S: int, spoof_type: int,
           outdoor: bool) -> tuple[np.ndarray, np.ndarray]:
    """A spoof of subject ``who``: ``(image float32 BGR SxS in [0,1], face mask float32 SxS)``."""
    W = int(round(S * 1.5))  # re-capture canvas, supersampled: the camera integrates the pattern
    ss = W / S
    is_print = spoof_type in SPOOF_PRINT
    # the photo that is shown: the same subject, another pose/background/camera
    photo, pmask = draw_face(who, r, S, scale=(0.85, 1.15))
    photo = camera(photo, r, blur=(0.0, 0.7), noise=(0.5, 3.0))
    scene = background(r, W, outdoor)
    if is_print:
        medium = _print_medium(photo, pmask, r, spoof_type)
    else:
        medium = _screen_medium(photo, pmask, r, spoof_type)
    mh, mw = medium.face.shape
    strength = medium.strength

    # place the medium so the shown face lands near the frame centre at a "live-like" size
    ys, xs = np.nonzero(pmask > 0.5)
    fcx = medium.photo_origin[0] + (xs.mean() if len(xs) else S / 2)
    fcy = medium.photo_origin[1] + (ys.mean() if len(ys) else S / 2)
    scale = ss * r.uniform(0.8, 1.3)
    target = (W * (0.5 + r.uniform(-0.06, 0.06)), W * (0.48 + r.uniform(-0.05, 0.05)))
    H = _homography(r, mw, mh, (fcx, fcy), target, scale, medium.perspective)
    u, v = _inverse_map(H, W)
    bend = 0.0
    if is_print:  # paper bend: curved edges + shading across the fold
        bend = r.uniform(-1, 1) * r.uniform(0.0, 0.06)
        un = (u - mw / 2) / (mw / 2)
        v = v + (bend * mh * un ** 2).astype(np.float32)

    inside = ((u >= 0) & (u < mw) & (v >= 0) & (v < mh)).astype(np.float32)[..., None]
    face = _sample(medium.face, u, v)
    glare = None  # added at output resolution
    if is_print:
        img = _sample(medium.image, u, v)
        # halftone dot screen, evaluated at the exact medium position -> survives re-sampling
        hs = np.float32(r.beta(2.0, 2.0) * strength ** 0.5)
        period = r.uniform(1.2, 3.5) / scale * ss  # in medium px, so ~1.2-3.5 camera px at S
        ang = r.uniform(0, np.pi / 2)
        k = np.float32(2 * np.pi / period)
        ca, sa = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        thr = 0.5 + 0.25 * (np.cos((u * ca + v * sa) * k) + np.cos((v * ca - u * sa) * k))
        ink = 1.0 - img / medium.paper
        dots = np.clip((ink - thr[..., None]) * 3.0 + 0.5, 0.0, 1.0)
        img += ((1.0 - dots) * medium.paper - img) * hs
        if bend:
            img *= (1.0 - abs(bend) * r.uniform(2, 6) * ((u - mw / 2) / (mw / 2)) ** 2)[..., None]
        if r.random() < 0.3:  # glossy photo paper glint
            glare = Glare(amplitude=r.uniform(0.05, 0.25), centre=r.uniform(0.2, 0.8, 2),
                          axes=(0.2, 0.12), angle=0.0)
    else:
        # the screen shows the photo at its own pixel pitch, through RGB sub-pixel stripes
        pitch = r.uniform(0.55, 2.8) / scale * ss  # medium px per screen px (~camera px at S)
        fu, fv = u / pitch, v / pitch
        iu, iv = np.floor(fu), np.floor(fv)
        img = _sample(medium.image, (iu + 0.5) * pitch, (iv + 0.5) * pitch)
        sub = np.minimum(((fu - iu) * 3).astype(np.int8), 2)  # 0 R, 1 G, 2 B
        dark = np.float32(r.uniform(0.0, 0.35))
        on = sub[..., None] == np.array([2, 1, 0], np.int8)  # BGR channel -> sub-pixel index
        pat = np.where(on, np.float32(1.0), dark)
        pat *= np.where((fv - iv) > r.uniform(0.8, 0.95), dark, np.float32(1.0))[..., None]
        pat /= np.asarray(cv2.mean(pat)[:3], np.float32) + 1e-6
        ms = (0.4 + 0.6 * strength) * r.uniform(0.3, 1.0)
        active = _sample(_active_mask(mh, mw, medium.photo_origin, S), u, v)[..., None]
        img *= 1.0 + (pat - 1.0) * (np.float32(ms) * active)
        # ambient reflection lowers contrast; glare: bright elliptical highlight
        refl = np.float32(r.uniform(0.0, 0.15) * strength)
        img *= 1 - refl
        img += refl * scene.mean(axis=(0, 1))
        if r.random() < 0.75:
            glare = Glare(amplitude=r.uniform(0.1, 0.7) * strength, centre=r.uniform(0.15, 0.85, 2),
                          axes=(r.uniform(0.08, 0.3), r.uniform(0.04, 0.15)), angle=r.uniform(0, 180))

    comp = scene + (img - scene) * inside
    if is_print and r.random() < 0.5:
        thumb = np.zeros((W, W), np.float32)
        _hand(comp, thumb, r, H, mw, mh, who.skin)
        face *= thumb < 0.5  # an occluding thumb is not face
    comp = cv2.resize(comp, (S, S), interpolation=cv2.INTER_AREA)
    face = cv2.resize(face, (S, S), interpolation=cv2.INTER_AREA)
    if glare is not None:
        gx, gy = glare.centre
        ax, ay = glare.axes
        cover = cv2.resize(inside[..., 0], (S, S), interpolation=cv2.INTER_AREA)
        Y, X = np.ogrid[0:S, 0:S]
        Y, X = Y.astype(np.float32) / S - gy, X.astype(np.float32) / S - gx
        c = np.float32(math.cos(math.radians(glare.angle)))
        s_ = np.float32(math.sin(math.radians(glare.angle)))
        g = np.exp(-(((X * c + Y * s_) / ax) ** 2 + ((Y * c - X * s_) / ay) ** 2))
        comp += (np.float32(glare.amplitude) * g * cover)[..., None]
    # ambient lighting of the re-capture
    gain = light(r, S, (S / 2, S / 2), 0.3) * (
        np.float32(r.uniform(0.8, 1.15)) * r.uniform(0.93, 1.07, 3).astype(np.float32))
    return np.clip(comp * gain, 0, 1), face


# --------------------------------------------------------------------------------------------
# The media
# --------------------------------------------------------------------------------------------


def _print_medium(photo: np.ndarray, pmask: np.ndarray, r: np.random.Generator,
                  spoof_type: int) -> Medium:
    """The photo printed: gamut/contrast loss, warm paper, raised blacks, slight ink spread."""
    Sc = photo.shape[0]
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
    if spoof_type == PHOTO and r.random() < 0.5:
        m = [0, 0, 0, 0]  # photo paper: borderless
    mw, mh = Sc + m[0] + m[2], Sc + m[1] + m[3]
    med = np.ones((mh, mw, 3), np.float32) * paper
    med[m[1]:m[1] + Sc, m[0]:m[0] + Sc] = c
    fibre = cv2.GaussianBlur(r.standard_normal((mh, mw), dtype=np.float32), (0, 0), 0.8)
    med *= 1.0 + r.uniform(0.01, 0.06) * strength * fibre[..., None]
    fmask = np.zeros((mh, mw), np.float32)
    fmask[m[1]:m[1] + Sc, m[0]:m[0] + Sc] = pmask
    return Medium(image=med, face=fmask, photo_origin=(m[0], m[1]), strength=strength,
                  perspective=r.uniform(0.0, 0.35), paper=paper)


def _screen_medium(photo: np.ndarray, pmask: np.ndarray, r: np.random.Generator,
                   spoof_type: int) -> Medium:
    """The photo on a display: gamma, gain, tint; a bezel around the active area."""
    Sc = photo.shape[0]
    strength = r.beta(2.0, 2.0)
    gamma = r.uniform(0.75, 1.3)
    c = np.clip(photo, 0, 1) ** gamma
    tint = np.array([1 + r.uniform(0, 0.15), 1.0, 1 - r.uniform(0, 0.1)], np.float32)
    c = c * r.uniform(0.9, 1.2) * (tint if r.random() < 0.6 else 1.0)
    sat = 1.0 + r.uniform(-0.2, 0.35) * strength
    gray = c.mean(axis=2, keepdims=True)
    c = np.clip(gray + (c - gray) * sat, 0, 1).astype(np.float32)
    bw = int(Sc * r.uniform(*_BEZEL_WIDTH[spoof_type]))
    mw = mh = Sc + 2 * bw
    bez = np.array([r.uniform(0.02, 0.12)] * 3, np.float32) * r.uniform(0.8, 1.2, 3)
    med = np.ones((mh, mw, 3), np.float32) * bez.astype(np.float32)
    med[bw:bw + Sc, bw:bw + Sc] = c
    fmask = np.zeros((mh, mw), np.float32)
    fmask[bw:bw + Sc, bw:bw + Sc] = pmask
    return Medium(image=med, face=fmask, photo_origin=(bw, bw), strength=strength,
                  perspective=r.uniform(0.0, 0.25), paper=None)


def _active_mask(mh: int, mw: int, off: tuple[int, int], Sc: int) -> np.ndarray:
    m = np.zeros((mh, mw), np.float32)
    m[off[1]:off[1] + Sc, off[0]:off[0] + Sc] = 1.0
    return m


# --------------------------------------------------------------------------------------------
# Re-capture geometry and the holding hand
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
    """Medium coordinates (u, v) of every camera pixel centre of a W x W frame."""
    Hi = np.linalg.inv(H)
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
    ellipse(canvas, (x, y), (L * 0.55, L), ang, cv_color(skin * r.uniform(0.8, 1.0)))
    ellipse(mask, (x, y), (L * 0.55, L), ang, 1.0)
