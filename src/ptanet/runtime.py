"""The inference runtime of exported models: ONNX Runtime and numpy only, never torch.

``ortsession`` opens an exported file with the session options ptanet always wants, and
``read_metadata`` reads the ptanet metadata every export carries (preprocessing, label map,
configuration), so a deployment needs the ``.onnx`` file, onnxruntime and numpy, nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnxruntime as ort

INPUT_NAME = "image"  # uint8 (N, S, S, 3) RGB face crops, as Preprocess.crop returns them
CONFIG_INPUT = "config"  # int64 scalar: index into the metadata's "configs" (switchable artifacts only)
OUTPUT_NAMES = ("probabilities", "spoof_score")  # (N, 2) [live, spoof] and (N,) P(spoof)
METADATA_FORMAT = "ptanet.onnx"
# 2: uint8 NHWC input with the normalisation inside the graph, probabilities out. Version 1 files took
# normalised float NCHW input; feeding them crops would silently give wrong scores, so they are refused.
METADATA_VERSION = 2


def ortsession(path: str | os.PathLike, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session with the options ptanet always wants.

    ``threads`` intra-op threads, one inter-op thread. ``session.force_spinning_stop`` makes idle
    worker threads sleep instead of spin: with several sessions of 2+ threads in one process
    (export verification next to a predictor, tests), spinning threads steal each other's cores
    and everything runs 6-10x slower.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file") from None
        raise ValueError(f"{path}: onnxruntime cannot load this model ({type(exc).__name__}: {str(exc)[:300]})") from None


def read_metadata(source: str | os.PathLike | ort.InferenceSession, name: str | None = None) -> dict:
    """The ptanet metadata of an exported file (or of an open session), JSON values decoded.

    Keys: ``format``, ``format_version``, ``config`` (None for the No PTA baseline), ``model``
    (table label), ``preprocess``, ``labels`` ({0: 'live', 1: 'spoof'}), ``arch``, ``input``,
    ``outputs``, ``versions``. Raises ValueError naming the file (``name`` for a session) if it was
    not written by ptanet.
    """
    session = source if isinstance(source, ort.InferenceSession) else ortsession(source)
    props = session.get_modelmeta().custom_metadata_map
    where = name or (source if not isinstance(source, ort.InferenceSession) else "<onnx session>")
    if props.get("format") != json.dumps(METADATA_FORMAT):
        raise ValueError(f"{where}: not a ptanet ONNX export (no {METADATA_FORMAT!r} metadata)")
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: corrupt ptanet metadata ({exc})") from None
    if meta.get("format_version", 0) != METADATA_VERSION:
        raise ValueError(f"{where}: ptanet ONNX format version {meta.get('format_version')}, this ptanet reads "
                         f"version {METADATA_VERSION} only; export the checkpoint again with this ptanet")
    meta["labels"] = {int(k): v for k, v in meta["labels"].items()}
    return meta
