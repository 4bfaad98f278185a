"""Training-time augmentations of the paper (Section 4): colour jitter and ISO noise, plus an optional
horizontal flip, an optional small affine jitter and an optional zoom into the crop (none of them in the paper;
see ``make_train_augment``).

All ranges are explicit: albumentations 2.x's ColorJitter default hue range is (-0.5, 0.5), i.e. the
whole hue wheel, which would turn faces blue or green and destroy the colour cues that separate live
faces from prints and screens.
"""

from __future__ import annotations

import albumentations as A
import cv2

# torchvision-style magnitudes: factor in [1 - 0.2, 1 + 0.2], hue shift within +-0.05 of the wheel.
COLOR_JITTER = {"brightness": (0.8, 1.2), "contrast": (0.8, 1.2), "saturation": (0.8, 1.2),
                "hue": (-0.05, 0.05)}
ISO_NOISE = {"color_shift": (0.01, 0.05), "intensity": (0.1, 0.5)}
# Small shifts of scale, position and angle, as between face boxes of different detectors and
# people; reflected borders, so no black corners that only augmented crops would show.
AFFINE = {"scale": (0.9, 1.1), "translate_percent": (-0.05, 0.05), "rotate": (-10, 10),
          "border_mode": cv2.BORDER_REFLECT_101}


def make_train_augment(seed: int | None = None, hflip: bool = False, affine: bool = False, zoom: float = 1.0,
                       size: int = 128) -> A.Compose:
    """Compose of ColorJitter and ISONoise, each applied with p=0.5, to uint8 HxWx3 RGB crops;
    with ``hflip`` also a horizontal flip with p=0.5.

    The paper names only the first two. A model trained without the flip is not mirror-invariant
    (in a one-off check on nuaa-dev, averaging the No PTA model's scores over each image and its
    mirror raised test ACER from 4.2 % to 9.7 %), which is why the flip is offered; yet training
    with it made nuaa-dev test ACER worse in both runs that tried it (docs/experiments.md), so it stays off.
    ``affine`` adds ``AFFINE`` with p=0.5 (did not help on nuaa-dev either).
    ``zoom`` > 1 first zooms in, with p=0.5: a square window whose side is between 1/zoom of the crop
    and all of it (uniform in area), at a random place, resized back to ``size`` x ``size`` (the crops'
    side). With a wide crop (``box_scale`` > 1) the network then also trains on views where a photo's
    edge or the background is out of sight, and must find the spoof in the face itself.

    Call it as `augment(image=crop)["image"]`; the result is uint8 of the same shape. The Compose has its
    own random state (`seed`), independent of numpy's, Python's and torch's global generators, so
    augmenting never disturbs other seeded sampling (e.g. of PTA configurations).
    """
    if zoom < 1.0:
        raise ValueError(f"zoom must be >= 1 (1 is off), got {zoom}")
    transforms = []
    if zoom > 1.0:  # before the noise, so that the sensor noise is not magnified with the pixels
        transforms.append(A.RandomResizedCrop(size=(size, size), scale=(1.0 / zoom ** 2, 1.0), ratio=(1.0, 1.0), p=0.5))
    transforms += [A.ColorJitter(**COLOR_JITTER, p=0.5), A.ISONoise(**ISO_NOISE, p=0.5)]
    if hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if affine:
        transforms.append(A.Affine(**AFFINE, p=0.5))
    return A.Compose(transforms, seed=seed)
