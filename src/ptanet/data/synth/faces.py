"""The live face: per-subject identity, background scene, drawing, lighting and camera.

Images are float32 BGR in [0, 1].  Every random draw comes from the generator the caller passes,
in a fixed order, so the same generator state always gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import cv2
import numpy as np

# RGB skin tones from light to dark (stored here as RGB, converted to BGR when used).
_SKIN_RGB = np.array(
    [[255, 226, 204], [241, 194, 167], [226, 175, 140], [198, 136, 100],
     [161, 108, 76], [121, 80, 56], [88, 58, 40]], np.float32) / 255.0
_HAIR_RGB = np.array(
    [[28, 24, 22], [58, 40, 30], [100, 68, 44], [196, 164, 108], [150, 72, 40],
     [165, 160, 155], [45, 35, 30]], np.float32) / 255.0
_IRIS_RGB = np.array([[80, 50, 30], [60, 100, 150], [70, 110, 70], [40, 30, 25]],
                     np.float32) / 255.0


class HairStyle(IntEnum):
    SHORT = 0
    LONG = 1
    BALD = 2
    CURLY = 3


@dataclass(frozen=True)
class Identity:
    """What stays the same across one subject's images.

    Colours are float32 BGR in [0, 1].  Sizes are fractions: ``head_half_width`` of the frame
    width; the horizontal ones (``*_half_width``, ``eye_offset``, ``ear_size``, ``brow_thickness``)
    of the head's half width; the vertical ones (heights, depths, lengths) of its half height.
    """

    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    shirt: np.ndarray
    head_half_width: float
    head_aspect: float  # head half height / half width
    hair_style: HairStyle
    hairline_height: float  # above the head centre
    fringe_depth: float  # how far the fringe curves down in the middle (negative: up)
    hair_parting: float  # moves the fringe's deepest point sideways
    eye_height: float  # above the head centre
    eye_offset: float  # from the face's centre line to each eye
    eye_half_width: float
    eye_aspect: float  # eye half height / half width, fully open
    brow_thickness: float
    brow_tilt: float
    brow_height: float  # above the eye
    nose_length: float
    nose_half_width: float
    mouth_depth: float  # below the head centre
    mouth_half_width: float
    lip_height: float
    glasses: bool
    beard: bool
    ear_size: float  # half width; the half height is 1.7 times it


def subject_identity(seed: int, subject: int) -> Identity:
    """The identity of ``subject``: its own RNG from ``(seed, subject)``, so every image agrees."""
    r = np.random.default_rng([seed, 0x5B1EC7, subject])
    skin = _rgb2bgr(_lerp_palette(_SKIN_RGB, r.beta(1.3, 1.3)) * r.uniform(0.95, 1.05, 3))
    hair = _rgb2bgr(_HAIR_RGB[r.integers(len(_HAIR_RGB))] * r.uniform(0.85, 1.15, 3))
    # keyword arguments are evaluated in the order written: this is the order of the draws
    return Identity(
        skin=skin,
        hair=hair,
        iris=_rgb2bgr(_IRIS_RGB[r.integers(len(_IRIS_RGB))]),
        lips=np.clip(skin * np.array([0.62, 0.55, 0.95], np.float32) * r.uniform(0.85, 1.1), 0, 1),
        shirt=r.uniform(0.05, 0.95, 3).astype(np.float32),
        head_half_width=r.uniform(0.19, 0.23),
        head_aspect=r.uniform(1.18, 1.42),
        hair_style=HairStyle(int(r.choice(4, p=[0.45, 0.3, 0.1, 0.15]))),
        hairline_height=r.uniform(0.32, 0.55),
        fringe_depth=r.uniform(-0.08, 0.15),
        hair_parting=r.uniform(-0.6, 0.6),
        eye_height=r.uniform(0.02, 0.14),
        eye_offset=r.uniform(0.36, 0.46),
        eye_half_width=r.uniform(0.16, 0.22),
        eye_aspect=r.uniform(0.35, 0.55),
        brow_thickness=r.uniform(0.035, 0.08),
        brow_tilt=r.uniform(-0.08, 0.1),
        brow_height=r.uniform(0.16, 0.26),
        nose_length=r.uniform(0.28, 0.42),
        nose_half_width=r.uniform(0.1, 0.17),
        mouth_depth=r.uniform(0.5, 0.62),
        mouth_half_width=r.uniform(0.26, 0.4),
        lip_height=r.uniform(0.05, 0.1),
        glasses=bool(r.random() < 0.2),
        beard=bool(r.random() < 0.15),
        ear_size=r.uniform(0.14, 0.2),
    )


# --------------------------------------------------------------------------------------------
# Drawing primitives (float canvases, sub-pixel coordinates)
# --------------------------------------------------------------------------------------------


def _rgb2bgr(c: np.ndarray) -> np.ndarray:
    return np.asarray(c, np.float32)[..., ::-1].copy()


def _lerp_palette(pal: np.ndarray, t: float) -> np.ndarray:
    t = float(np.clip(t, 0.0, 1.0)) * (len(pal) - 1)
    i = min(int(t), len(pal) - 2)
    f = t - i
    return pal[i] * (1 - f) + pal[i + 1] * f


def cv_color(c) -> tuple[float, float, float]:
    """float BGR in [0,1] -> cv2 colour tuple on a float canvas."""
    c = np.clip(np.asarray(c, np.float64), 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


def _pt(x: float, y: float, shift: int = 4) -> tuple[int, int]:
    m = 1 << shift
    return (int(round(x * m)), int(round(y * m)))


def ellipse(img, c, axes, angle, color, thickness=-1, a0=0, a1=360, shift=4):
    """cv2.ellipse with float centre and axes (fixed point, ``shift`` fractional bits)."""
    m = 1 << shift
    cv2.ellipse(img, _pt(*c, shift), (max(1, int(round(axes[0] * m))),
                                       max(1, int(round(axes[1] * m)))),
                angle, a0, a1, color, thickness, cv2.LINE_AA, shift)


def _smooth_noise(r: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in ~[-1, 1] of shape (h, w)."""
    small = r.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------------------------
# Background
# --------------------------------------------------------------------------------------------


def background(r: np.random.Generator, W_out: int, outdoor: bool) -> np.ndarray:
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
        c = cv_color(r.uniform(0.05, 0.95, 3) if not outdoor else
                     np.array([r.uniform(0.05, 0.4), r.uniform(0.25, 0.7), r.uniform(0.05, 0.5)]))
        kind = r.integers(3)
        if kind == 0:
            x0, y0 = r.uniform(-0.2, 1.0, 2) * W
            x1, y1 = x0 + r.uniform(0.1, 0.7) * W, y0 + r.uniform(0.1, 0.9) * W
            cv2.rectangle(img, _pt(x0, y0), _pt(x1, y1), c, -1, cv2.LINE_AA, 4)
        elif kind == 1:
            ellipse(img, r.uniform(0, 1, 2) * W, r.uniform(0.03, 0.25, 2) * W, r.uniform(0, 180), c)
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


def draw_face(who: Identity, r: np.random.Generator, S: int, ss: int = 1,
              scale: tuple[float, float] = (0.88, 1.12),
              bg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw subject ``who`` with a random pose/expression/lighting on a random background.

    Returns ``(image float32 BGR SxS in [0,1], face mask float32 SxS)``; the mask is the head
    (skin ellipse) the CelebA-style face box is taken from.
    """
    W = S * ss
    outdoor = bool(r.random() < 0.35)
    if bg is None:
        bg = background(r, W, outdoor)
    sc = r.uniform(*scale)
    cx = W * (0.5 + r.uniform(-0.06, 0.06))
    cy = W * (0.47 + r.uniform(-0.05, 0.05))
    roll = r.uniform(-13, 13)
    yaw = r.uniform(-1, 1) * 0.22
    a = who.head_half_width * W * sc  # head ellipse half axes
    b = a * who.head_aspect
    skin = who.skin * r.uniform(0.95, 1.05)
    hair = who.hair
    dark_skin = skin * 0.8
    fx = cx + yaw * a * 0.45  # features shift with yaw

    layer = np.zeros((W, W, 3), np.float32)
    alpha = np.zeros((W, W), np.float32)
    head = np.zeros((W, W), np.float32)

    def fill_ellipse(c, axes, color, ang=0.0, a0=0, a1=360):
        ellipse(layer, c, axes, ang, cv_color(color), -1, a0, a1)
        ellipse(alpha, c, axes, ang, 1.0, -1, a0, a1)

    def fill_poly(pts, color):
        pts = np.round(np.asarray(pts) * 16).astype(np.int32)
        cv2.fillPoly(layer, [pts], cv_color(color), cv2.LINE_AA, 4)
        cv2.fillPoly(alpha, [pts], 1.0, cv2.LINE_AA, 4)

    style = who.hair_style
    if style == HairStyle.LONG:  # long hair behind the head
        fill_ellipse((cx, cy + 0.3 * b), (1.32 * a, 1.25 * b), hair * 0.9)
    # shoulders, neck
    fill_ellipse((cx, cy + 1.05 * b + 0.85 * a), (2.3 * a, 0.95 * a), who.shirt)
    fill_poly([(cx - 0.42 * a, cy + 0.4 * b), (cx + 0.42 * a, cy + 0.4 * b),
               (cx + 0.46 * a, cy + 1.12 * b), (cx - 0.46 * a, cy + 1.12 * b)], dark_skin)
    fill_ellipse((cx, cy + 1.1 * b), (0.46 * a, 0.14 * a), dark_skin, a0=0, a1=180)
    if style == HairStyle.LONG:
        for sgn in (-1, 1):
            fill_ellipse((cx + sgn * 0.95 * a, cy + 0.75 * b), (0.35 * a, 0.7 * b), hair * 0.95)
    # ears (the far one hides with yaw)
    for sgn in (-1, 1):
        ex = cx + sgn * a * (0.97 - 0.25 * max(0.0, sgn * -yaw) * 4)
        fill_ellipse((ex, cy + 0.05 * b), (who.ear_size * a, who.ear_size * 1.7 * a), skin * 0.9)
    # head
    fill_ellipse((cx, cy), (a, b), skin)
    ellipse(head, (cx, cy), (a, b), 0, 1.0)
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
    if style != HairStyle.BALD:
        top = cy - 1.07 * b
        t = np.linspace(-1, 1, 41)
        xs = cx + t * 1.06 * a
        ylow = (cy - who.hairline_height * b
                - who.fringe_depth * b * (1 - (t - who.hair_parting * 0.3) ** 2) + 0.55 * b * t ** 6)
        arc = np.linspace(np.pi, 2 * np.pi, 41)
        xs_top = cx + 1.06 * a * np.cos(arc)
        ys_top = np.minimum(cy - 0.25 * b, cy + (1.07 * b) * np.sin(arc))
        poly = list(zip(xs_top, ys_top)) + list(zip(xs[::-1], ylow[::-1]))
        fill_poly(poly, hair)
        if style == HairStyle.CURLY:  # bumps along the outline
            for th in np.linspace(np.pi * 0.95, np.pi * 2.05, 13):
                rr = r.uniform(0.17, 0.25) * a
                fill_ellipse((cx + 1.02 * a * np.cos(th), cy + 1.0 * b * np.sin(th) + 0.05 * b),
                             (rr, rr), hair * r.uniform(0.85, 1.1))
        # a few strands for texture
        for _ in range(12):
            x0 = cx + r.uniform(-0.8, 0.8) * a
            y0 = top + r.uniform(0.05, 0.4) * b
            cv2.line(layer, _pt(x0, y0), _pt(x0 + r.uniform(-0.3, 0.3) * a, y0 + r.uniform(0.1, 0.3) * b),
                     cv_color(hair * r.uniform(0.7, 1.3)), max(1, W // 200), cv2.LINE_AA, 4)
    else:
        fill_ellipse((cx, cy - 0.7 * b), (0.7 * a, 0.3 * b), hair, a0=180, a1=360)

    # beard
    if who.beard:
        t = np.linspace(0, np.pi, 31)
        outer = [(cx + 0.98 * a * np.cos(tt), cy + 0.15 * b + 0.88 * b * np.sin(tt)) for tt in t]
        inner = [(fx + 0.5 * a * np.cos(tt), cy + 0.42 * b + 0.25 * b * np.sin(tt)) for tt in t[::-1]]
        pts = np.round(np.asarray(outer + inner) * 16).astype(np.int32)
        ov = layer.copy()
        cv2.fillPoly(ov, [pts], cv_color(hair), cv2.LINE_AA, 4)
        layer = layer * 0.3 + ov * 0.7

    # eyes
    eye_open = r.uniform(0.6, 1.15) if r.random() > 0.05 else 0.15
    ey = cy - who.eye_height * b
    ew, eh = who.eye_half_width * a, who.eye_half_width * a * who.eye_aspect * eye_open
    gaze = r.uniform(-0.3, 0.3, 2)
    for sgn in (-1, 1):
        ex = fx + sgn * who.eye_offset * a * (1 - 0.3 * sgn * yaw)
        ellipse(layer, (ex, ey), (ew * 1.25, ew * 0.75), 0, cv_color(skin * 0.82))  # socket
        ellipse(layer, (ex, ey), (ew, eh), 0, cv_color(np.array([0.93, 0.94, 0.95]) * r.uniform(0.9, 1.0)))
        ir = min(0.42 * ew, eh * 1.2)
        ix, iy = ex + gaze[0] * ew * 0.4, ey + gaze[1] * eh * 0.3
        ellipse(layer, (ix, iy), (ir, min(ir, eh)), 0, cv_color(who.iris))
        ellipse(layer, (ix, iy), (ir * 0.45, min(ir * 0.45, eh)), 0, cv_color((0.03, 0.03, 0.03)))
        ellipse(layer, (ix + ir * 0.3, iy - ir * 0.3), (ir * 0.18, ir * 0.18), 0, cv_color((1, 1, 1)))
        ellipse(layer, (ex, ey), (ew, eh), 0, cv_color(skin * 0.35), max(1, W // 160), 180, 360)
        # brow
        by = ey - who.brow_height * b
        x_in, x_out = ex - sgn * 0.9 * ew, ex + sgn * 1.2 * ew
        pts = np.array([(x_in, by + who.brow_tilt * b * 0.5), (ex, by - 0.05 * b),
                        (x_out, by + 0.03 * b - who.brow_tilt * b * 0.3)])
        cv2.polylines(layer, [np.round(pts * 16).astype(np.int32)], False, cv_color(hair * 0.9),
                      max(1, int(who.brow_thickness * a)), cv2.LINE_AA, 4)
    # nose
    ny0, ny1 = ey + 0.05 * b, ey + who.nose_length * b * 1.6
    nx = fx + yaw * 0.3 * a
    cv2.line(layer, _pt(fx + 0.05 * a * np.sign(yaw + 1e-6), ny0), _pt(nx + 0.06 * a, ny1 - 0.05 * b),
             cv_color(skin * 0.72), max(1, W // 180), cv2.LINE_AA, 4)
    ellipse(layer, (nx, ny1 - 0.02 * b), (who.nose_half_width * a, 0.06 * b), 0, cv_color(skin * 0.85))
    for sgn in (-1, 1):
        ellipse(layer, (nx + sgn * 0.5 * who.nose_half_width * a, ny1), (0.04 * a, 0.025 * a), 0,
                cv_color(skin * 0.4))
    # mouth
    my = cy + who.mouth_depth * b
    mw = who.mouth_half_width * a * r.uniform(0.9, 1.15)
    lh = who.lip_height * b
    smile = r.uniform(-0.3, 1.0)
    opened = r.random() < 0.3
    if opened:
        ellipse(layer, (fx, my), (mw, lh * 1.6), 0, cv_color(who.lips))
        ellipse(layer, (fx, my + 0.1 * lh), (mw * 0.85, lh * 1.0), 0, cv_color((0.1, 0.08, 0.2)))
        ellipse(layer, (fx, my - 0.5 * lh), (mw * 0.7, lh * 0.35), 0, cv_color((0.9, 0.93, 0.95)))
    else:
        ellipse(layer, (fx, my - 0.35 * lh), (mw, lh * 0.7), 0, cv_color(who.lips * 0.92), -1, 180, 360)
        ellipse(layer, (fx, my - 0.2 * lh), (mw * 0.95, lh), 0, cv_color(who.lips), -1, 0, 180)
        ellipse(layer, (fx, my - 0.3 * lh - smile * 0.3 * lh), (mw, max(1.0, smile * 0.6 * lh)), 0,
                cv_color(who.lips * 0.45), max(1, W // 200), 0, 180)
    # glasses
    if who.glasses:
        gc = cv_color(np.array([0.05, 0.05, 0.05]) + r.uniform(0, 0.3))
        th = max(1, W // 130)
        for sgn in (-1, 1):
            ex = fx + sgn * who.eye_offset * a
            ellipse(layer, (ex, ey), (ew * 1.5, ew * 1.1), 0, gc, th)
            ellipse(alpha, (ex, ey), (ew * 1.5, ew * 1.1), 0, 1.0, th)
        cv2.line(layer, _pt(fx - who.eye_offset * a + ew * 1.5, ey), _pt(fx + who.eye_offset * a - ew * 1.5, ey),
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
    gain = light(r, S, (cx / ss, cy / ss), 0.45) * (
        np.float32(r.uniform(0.75, 1.2)) * r.uniform(0.9, 1.1, 3).astype(np.float32))
    img = np.clip(img * gain, 0, 1)
    return img, head


# --------------------------------------------------------------------------------------------
# Lighting and camera
# --------------------------------------------------------------------------------------------


def light(r: np.random.Generator, W: int, c: tuple[float, float], kmax: float) -> np.ndarray:
    """Directional lighting gradient (W, W, 1) float32."""
    th = r.uniform(0, 2 * np.pi)
    k = r.uniform(0.0, kmax) / (W * 0.5)
    yy, xx = np.ogrid[0:W, 0:W]
    gx = (1.0 + k * np.cos(th) * (xx - c[0])).astype(np.float32)
    gy = (k * np.sin(th) * (yy - c[1])).astype(np.float32)
    return (gx + gy)[..., None]


def camera(img: np.ndarray, r: np.random.Generator, blur: tuple[float, float],
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
