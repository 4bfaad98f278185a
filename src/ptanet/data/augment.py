"""Training-time augmentations of the paper (Section 4): colour jitter and ISO noise.

All ranges are explicit: albumentations 2.x's ColorJitter default hue range is (-0.5, 0.5), i.e. the
whole hue wheel, which would turn faces blue or green and destroy the colour cues that separate live
faces from prints and screens.
"""

from __future__ import annotations

import albumentations as A

# torchvision-style magnitudes: factor in [1 - 0.2, 1 + 0.2], hue shift within +-0.05 of the wheel.
COLOR_JITTER = {"brightness": (0.8, 1.2), "contrast": (0.8, 1.2), "saturation": (0.8, 1.2),
                "hue": (-0.05, 0.05)}
ISO_NOISE = {"color_shift": (0.01, 0.05), "intensity": (0.1, 0.5)}


def make_train_augment(seed: int | None = None) -> A.Compose:
    """Compose of ColorJitter and ISONoise, each applied with p=0.5, to uint8 HxWx3 RGB crops.

    Call it as `augment(image=crop)["image"]`; the result is uint8 of the same shape. The Compose has its
    own random state (`seed`), independent of numpy's, Python's and torch's global generators, so
    augmenting never disturbs other seeded sampling (e.g. of PTA configurations).
    """
    return A.Compose(
        [A.ColorJitter(**COLOR_JITTER, p=0.5), A.ISONoise(**ISO_NOISE, p=0.5)],
        seed=seed,
    )
