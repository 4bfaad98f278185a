"""ONNX export: one self-describing, verified ``.onnx`` file per PTA configuration.

A PTA model switches configurations at run time, but a deployment usually wants one fixed speed
point and no PyTorch. So each configuration is reduced with ``PTAMobileNetV2.to_static(config)`` --
the same module evaluation measures, with that configuration's BatchNorm statistics -- and exported
alone. The graph takes ``image`` (N,3,H,W float, already normalised) and returns ``logits`` and
``spoof_score`` (softmax probability of class 1, spoof). Preprocessing, label map and configuration
travel inside the file as ``metadata_props`` (JSON strings), so the ``.onnx`` alone is enough to
run it correctly (see :func:`read_metadata` and ``ptanet.infer.Predictor``).

Every export is checked before it is published: onnxruntime runs the written file on a random batch
and its outputs must match PyTorch's (run in float64, see ``_verify``); only then is the file renamed
into place.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
from torch import nn

import ptanet
from ptanet.atomic import atomic_write, write_json_atomic
from ptanet.checkpoint import Checkpoint, load_checkpoint, versions
from ptanet.configs import config_label, parse_config, parse_configs
from ptanet.models import MobileNetV2, held_config, is_pta
from ptanet.preprocess import Preprocess
from ptanet.runtime import INPUT_NAME, METADATA_FORMAT, METADATA_VERSION, OUTPUT_NAMES, ortsession

DEFAULT_OPSET = 17
# Float32 conv stacks differ between PyTorch and onnxruntime kernels by ~1e-6 relative; 1e-4 catches
# real mismatches (wrong BN statistics, wrong branch, wrong op semantics) with a wide margin. It is
# absolute for logits up to 1 in size and relative beyond, since rounding grows with the values.
VERIFY_TOLERANCE = 1e-4
# ... or this many times PyTorch float32's own error against float64 on the model, if larger (an
# ill-conditioned but valid model; onnxruntime measured at most 2.5 times PyTorch's error).
OWN_ERROR_FACTOR = 8.0
MANIFEST_NAME = "manifest.json"


class SpoofScorer(nn.Module):
    """Wraps a classifier so it returns ``(logits, spoof_score)``.

    This is the one definition of the score (softmax probability of the spoof class, label 1):
    the exported graph and the PyTorch path of ``ptanet.infer`` both run it, so they cannot drift.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=1)[:, 1]


@dataclass
class _Source:
    """What an export needs from a checkpoint or a bare model."""

    model: MobileNetV2
    preprocess: dict
    labels: dict[int, str]
    origin: str


def _source(obj: str | os.PathLike | Checkpoint | MobileNetV2, preprocess: dict | None) -> _Source:
    if isinstance(obj, (str, os.PathLike)):
        obj = load_checkpoint(obj)
    if isinstance(obj, Checkpoint):
        # The file name only: an absolute path would leak the exporting machine's layout into deployments.
        return _Source(obj.model, preprocess or obj.preprocess, obj.labels, Path(obj.path).name)
    if isinstance(obj, MobileNetV2):
        # A bare model has no stored preprocessing: the paper's defaults unless the caller says.
        return _Source(obj, preprocess or Preprocess().to_dict(), dict(ptanet.LABELS), f"<{type(obj).__name__}>")
    raise TypeError(f"expected a checkpoint path, a Checkpoint or a MobileNetV2 model, got {type(obj).__name__}")


def _static_module(model: MobileNetV2, config: str | None) -> tuple[nn.Module, str | None]:
    """The module to export for ``config``, in eval mode, and the canonical config (None = no PTA)."""
    if is_pta(model):
        config = parse_config(config if config is not None else model.config, model.num_pta_blocks)
        return model.to_static(config).eval(), config
    own = held_config(model)  # a checkpoint that already holds one static configuration
    if config is not None and (own is None or parse_config(config) != own):
        what = f"holds configuration {own} only" if own else "is the No PTA baseline"
        raise ValueError(f"cannot export configuration {config!r}: the model {what} and has no PTA blocks to switch")
    return copy.deepcopy(model).eval(), own


def _metadata(config: str | None, src: _Source, arch: dict, size: int) -> dict[str, str]:
    meta = {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "config": config,
        "model": config_label(config),
        "preprocess": src.preprocess,
        "labels": {str(k): v for k, v in src.labels.items()},
        "arch": arch,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, size, size], "dtype": "float32",
                  "note": "RGB/BGR order, mean and std as in preprocess; already normalised"},
        "outputs": {"logits": "(N, num_classes) raw class scores",
                    "spoof_score": "(N,) softmax probability of label 1 (spoof); predict spoof iff >= threshold"},
        "versions": {**versions(), "onnx": onnx.__version__},
        "source": src.origin,
    }
    return {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}


def _to_onnx_bytes(module: nn.Module, size: int, opset: int, dynamic_batch: bool) -> bytes:
    buf = io.BytesIO()
    dynamic_axes = {name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
    with warnings.catch_warnings():
        # We choose the TorchScript exporter on purpose (the dynamo one needs onnxscript and gains
        # nothing for a plain conv net); its deprecation notice is noise for our users.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, (torch.zeros(1, 3, size, size),), buf, dynamo=False,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    return buf.getvalue()


@torch.inference_mode()
def _verify(path: Path, module: nn.Module, size: int, batch: int, name: Path, seed: int = 0) -> float:
    """Max |onnxruntime - exact| over both outputs on a random batch of the file at ``path``, where
    "exact" is the same module run in float64; raises (naming the target ``name``) if over tolerance.

    The tolerance grows with PyTorch's own float32 error on this model: a barely trained model can
    hold BatchNorm variances near 1e-14, whose 1/sqrt(var + eps) magnifies rounding (measured:
    PyTorch float32 off float64 by 0.0025, onnxruntime by up to 2.5 times that). A real mismatch
    (wrong statistics, branch or op) is off by the size of the outputs themselves.
    """
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    single = [t.numpy() for t in module(x)]
    exact = [t.numpy() for t in copy.deepcopy(module).double()(x.double())]
    got = ortsession(path).run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    for output, e, g in zip(OUTPUT_NAMES, exact, got):
        if e.shape != g.shape:
            raise RuntimeError(f"{name}: onnxruntime output {output!r} has shape {g.shape}, PyTorch {e.shape}")
    diff = max(float(np.max(np.abs(e - g))) for e, g in zip(exact, got))
    own = max(float(np.max(np.abs(e - s))) for e, s in zip(exact, single))  # PyTorch float32's own error
    tolerance = max(VERIFY_TOLERANCE * max(1.0, float(np.max(np.abs(exact[0])))), OWN_ERROR_FACTOR * own)
    if not diff < tolerance:
        raise RuntimeError(f"{name}: onnxruntime and PyTorch outputs differ by {diff:.3g} (PyTorch in float64; "
                           f"tolerance {tolerance:.3g}, PyTorch's own float32 error {own:.3g})")
    return diff


def export_onnx(
    checkpoint_path_or_model: str | os.PathLike | Checkpoint | MobileNetV2,
    out_path: str | os.PathLike,
    config: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    preprocess: dict | None = None,
) -> dict:
    """Export one configuration to ``out_path`` and verify it with onnxruntime.

    ``config`` defaults to the checkpoint's active configuration; it must be None for the No PTA
    baseline. ``preprocess`` overrides the stored settings (needed only for a bare model, which
    otherwise gets the paper's defaults). The file is written to a temporary name, verified, and only
    then renamed over ``out_path``: a failed or interrupted export never leaves a bad model there.

    Returns ``{path, config, model, opset, max_abs_diff, size_bytes}``.
    """
    src = _source(checkpoint_path_or_model, preprocess)
    module, config = _static_module(src.model, config)
    return _export_static(module, config, src, Path(out_path), opset, dynamic_batch)


def _export_static(module: nn.Module, config: str | None, src: _Source, out_path: Path, opset: int,
                   dynamic_batch: bool) -> dict:
    size = Preprocess.from_dict(src.preprocess).size
    scorer = SpoofScorer(module).eval()
    proto = onnx.load_from_string(_to_onnx_bytes(scorer, size, opset, dynamic_batch))
    onnx.helper.set_model_props(proto, _metadata(config, src, dict(module.arch), size))
    proto.doc_string = f"ptanet {config_label(config)}: face anti-spoofing; spoof_score = P(spoof)"
    onnx.checker.check_model(proto)

    diff = float("nan")

    def verify(tmp: Path) -> None:  # on the written bytes, before they replace out_path
        nonlocal diff
        diff = _verify(tmp, scorer, size, 3 if dynamic_batch else 1, out_path)

    atomic_write(out_path, lambda f: f.write(proto.SerializeToString()), binary=True, check=verify)
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"path": str(out_path), "config": config, "model": config_label(config), "opset": opset_written,
            "max_abs_diff": diff, "size_bytes": out_path.stat().st_size}


def onnx_filename(config: str | None) -> str:
    """``model_LHH.onnx`` for a configuration, ``model_baseline.onnx`` for No PTA."""
    return f"model_{config or 'baseline'}.onnx"


def export_all(
    checkpoint: str | os.PathLike | Checkpoint | MobileNetV2,
    out_dir: str | os.PathLike,
    configs: Iterable[str] | str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> dict:
    """Export one ``.onnx`` per configuration into ``out_dir`` plus ``manifest.json``.

    ``configs``: a list, or a spec for :func:`ptanet.models.parse_configs` ("paper", "all",
    "HHH,LLL"); None = the paper's six. For a model without PTA blocks (No PTA baseline, or a
    static checkpoint) it must be None and the one model is exported. The manifest lists each file
    with its parameters and multiply-adds (``ptanet.bench``), sorted fastest first, so a device can
    pick the best configuration its time budget allows. Returns the manifest.
    """
    from ptanet.bench import count_macs, count_params  # ptflops is slow to import

    src = _source(checkpoint, None)
    if is_pta(src.model):
        if configs is None or isinstance(configs, str):
            wanted: list[str | None] = list(parse_configs(configs))
        else:
            wanted = list(dict.fromkeys(parse_config(c, src.model.num_pta_blocks) for c in configs))
            if not wanted:
                raise ValueError("no configuration to export; give e.g. ['HHH', 'LLL'] or None for the paper's six")
    elif configs:
        raise ValueError(f"{src.origin}: the model has no PTA blocks, so it has no configurations to export; "
                         "leave configs empty to export it as it is")
    else:
        wanted = [None]
    size = Preprocess.from_dict(src.preprocess).size
    out_dir = Path(out_dir)
    entries = []
    for config in wanted:
        module, canonical = _static_module(src.model, config)
        name = onnx_filename(canonical)
        result = _export_static(module, canonical, src, out_dir / name, opset, dynamic_batch)
        params, macs = count_params(module), count_macs(module, size)
        del result["path"]  # the manifest travels with its folder: file names only
        entries.append({"file": name, **result, "params": params, "params_m": params / 1e6,
                        "macs": macs, "mops": macs / 1e6})
    entries.sort(key=lambda e: e["macs"])
    manifest = {
        "format": "ptanet.onnx-manifest", "format_version": METADATA_VERSION, "source": src.origin,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, size, size]}, "outputs": list(OUTPUT_NAMES),
        "preprocess": src.preprocess, "labels": {str(k): v for k, v in src.labels.items()},
        "models": entries,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest, indent=2)
    return manifest

