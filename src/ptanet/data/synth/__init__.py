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

Modules: :mod:`~ptanet.data.synth.faces` (identity, background, face, lighting, camera),
:mod:`~ptanet.data.synth.attacks` (prints and replays), :mod:`~ptanet.data.synth.writer` (the
plan, labels, worker pool and files).
"""

from ptanet.data.synth.attacks import SPOOF_PRINT, SPOOF_REPLAY
from ptanet.data.synth.writer import BOX_FRAME, SPLITS, SynthSummary, ensure_synth, render_image, write_synth

__all__ = [
    "SynthSummary",
    "write_synth",
    "ensure_synth",
    "render_image",
    "SPOOF_PRINT",
    "SPOOF_REPLAY",
    "BOX_FRAME",
    "SPLITS",
]
