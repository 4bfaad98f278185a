"""ONNX export: self-contained, self-describing, verified ``.onnx`` files.

A PTA model switches configurations at run time, but a deployment wants no PyTorch. Each
configuration is reduced with ``PTAMobileNetV2.to_static(config)`` -- the same module evaluation
measures, with that configuration's BatchNorm statistics -- and wrapped in :class:`Deployable`, which
puts what a camera pipeline would otherwise have to get right inside the graph: the graph takes
``image``, uint8 RGB face crops (N, S, S, 3) as ``Preprocess.crop`` gives them, casts, orders the
channels (``Preprocess.color``), normalises with the stored mean/std and transposes to NCHW, and
returns ``probabilities`` (N, 2: [live, spoof]) and ``spoof_score`` (N,). Wrong channel order and
double normalisation, the classic silent failures of exported anti-spoofing models, cannot happen
outside the file. Preprocessing, label map, crop rule, threshold and configuration travel in the
file's ``metadata_props`` (JSON strings; :func:`ptanet.runtime.read_metadata`).

:func:`export_switchable_folder` (``ptanet export``'s default) writes one folder that holds several
configurations, one graph each, all reading one weights file; :func:`export_switchable` one file
that holds them as ``If`` branches (see their docstrings and the README's measurements).

Every export is checked before it is published: onnxruntime runs the written file on real face crops
from the checkpoint's training cache (generated crops when the cache cannot be reached; the result
says which) and its probabilities must match PyTorch's (run in float64, see ``_verify``); only then is the file renamed into place.
"""

from __future__ import annotations

import copy
import hashlib
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
from ptanet.runtime import (ARTIFACT_FORMAT, ARTIFACT_MANIFEST, ARTIFACT_VERSION, CONFIG_INPUT, INPUT_NAME,
                            METADATA_FORMAT, METADATA_VERSION, OUTPUT_NAMES, ortsession)

DEFAULT_OPSET = 17
# Float32 conv stacks differ between PyTorch and onnxruntime kernels by ~1e-6 relative; 1e-4 on the
# probabilities catches real mismatches (wrong BN statistics, wrong branch, wrong channel order or
# normalisation) with a wide margin.
VERIFY_TOLERANCE = 1e-4
VERIFY_CROPS = 32  # real crops per parity check: enough to see both classes, quick to run
# ... or this many times PyTorch float32's own error against float64 on the model, if larger (an
# ill-conditioned but valid model; onnxruntime measured at most 2.5 times PyTorch's error).
OWN_ERROR_FACTOR = 8.0
MANIFEST_NAME = "manifest.json"
SWITCHABLE_NAME = "model_switchable.onnx"  # the switchable file (If per configuration)
SWITCHABLE_DIR = "model_switchable"  # the switchable folder (one graph per configuration, one weights file)


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


class Deployable(nn.Module):
    """What is exported: uint8 RGB crops (N, S, S, 3) in, ``(probabilities, spoof_score)`` out.

    The cast, channel order, mean/std and NHWC -> NCHW of ``Preprocess.normalize`` happen here, in
    the graph, followed by the evaluated module itself and :class:`SpoofScorer`'s softmax.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.scorer = SpoofScorer(model)
        std = torch.tensor(preprocess.std, dtype=torch.float32)
        # x * scale + offset == (x / 255 - mean) / std, in the order normalize() computes it. Shaped
        # (1, 3, 1, 1) because the graph normalises after the NHWC -> NCHW transpose: onnxruntime
        # broadcasts over a trailing axis of 3 one 3-element span at a time (0.3 ms of a 2.2 ms
        # batch-1 run here), over a channel axis in spans of S x S.
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("offset", (-torch.tensor(preprocess.mean, dtype=torch.float32) / std).view(1, 3, 1, 1))
        self.bgr = preprocess.color == "BGR"

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        if self.bgr:  # crops are RGB; this network was trained on BGR
            x = x[:, [2, 1, 0]]
        x = x * self.scale + self.offset
        logits, spoof = self.scorer(x)
        return torch.softmax(logits, dim=1), spoof


@dataclass
class _Source:
    """What an export needs from a checkpoint or a bare model."""

    model: MobileNetV2
    preprocess: dict
    labels: dict[int, str]
    origin: str
    checkpoint: Checkpoint | None = None


def _source(obj: str | os.PathLike | Checkpoint | MobileNetV2, preprocess: dict | None) -> _Source:
    if isinstance(obj, (str, os.PathLike)):
        obj = load_checkpoint(obj)
    if isinstance(obj, Checkpoint):
        # The file name only: an absolute path would leak the exporting machine's layout into deployments.
        return _Source(obj.model, preprocess or obj.preprocess, obj.labels, Path(obj.path).name, obj)
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


# --- crops for the parity check -------------------------------------------------------------------
def generated_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images (N, size, size, 3): blurred blobs, not white noise, so the
    activations look more like a face crop's. The fallback when no training crops can be read."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
    idx = np.linspace(0, 7, size)
    lo, frac = np.floor(idx).astype(int), (idx - np.floor(idx))[None, :, None, None]
    hi = np.minimum(lo + 1, 7)
    rows = coarse[:, lo] * (1 - frac) + coarse[:, hi] * frac
    frac = frac.reshape(1, 1, size, 1)
    img = rows[:, :, lo] * (1 - frac) + rows[:, :, hi] * frac
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def training_crops(checkpoint: Checkpoint | None, n: int, size: int) -> tuple[np.ndarray | None, str]:
    """Up to ``n`` real face crops from the training crop cache a checkpoint was trained on (evenly
    spread over it, so both classes appear), and where they came from; (None, reason) when the cache
    cannot be reached or was cropped differently."""
    settings = (checkpoint.meta or {}).get("settings") if checkpoint is not None else None
    if not settings:
        return None, "no training settings stored with the model"
    try:
        # The training stack only when a training cache is read: the deployment core never needs it.
        from ptanet.data import CropCache
        from ptanet.train.settings import resolve_settings

        cache = CropCache(Path(resolve_settings(**settings).cache_dir) / "train")
    except (OSError, ValueError, TypeError, ImportError) as exc:
        return None, f"training crop cache not readable ({str(exc)[:120]})"
    if cache.crops.shape[1:] != (size, size, 3) or len(cache.crops) == 0:
        return None, f"training crop cache {cache.cache_dir} holds crops of shape {cache.crops.shape[1:]}"
    rows = np.unique(np.linspace(0, len(cache.crops) - 1, min(n, len(cache.crops))).astype(int))
    return np.ascontiguousarray(cache.crops[rows]), f"{len(rows)} crops of the training cache {cache.cache_dir}"


def parity_crops(src: _Source, n: int = VERIFY_CROPS) -> tuple[np.ndarray, str]:
    """Real training crops when reachable, else generated ones; and a line saying which."""
    size = Preprocess.from_dict(src.preprocess).size
    crops, where = training_crops(src.checkpoint, n, size)
    if crops is None:
        return generated_crops(n, size), f"{n} generated crops ({where})"
    return crops, where


# --- writing and checking one graph -------------------------------------------------------------------
def _json_props(meta: dict) -> dict[str, str]:
    return {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}


def _metadata(config: str | None, src: _Source, arch: dict, size: int, threshold: float | None,
              configs: list[dict]) -> dict:
    prep = Preprocess.from_dict(src.preprocess)
    if threshold is None and src.checkpoint is not None:  # the threshold ptanet calibrate stored, if any
        threshold = src.checkpoint.meta.get("threshold")
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "config": config,
        "model": config_label(config),
        "configs": configs,
        "preprocess": src.preprocess,
        "box_scale": prep.box_scale,
        "threshold": threshold,
        "labels": {str(k): v for k, v in src.labels.items()},
        "arch": arch,
        "input": {"name": INPUT_NAME, "shape": ["N", size, size, 3], "dtype": "uint8",
                  "note": "RGB face crops as Preprocess.crop returns them; the graph normalises"},
        "outputs": {"probabilities": "(N, 2) softmax over [live, spoof] (labels)",
                    "spoof_score": "(N,) probability of label 1 (spoof); predict spoof iff >= threshold"},
        "versions": {**versions(), "onnx": onnx.__version__},
        "source": src.origin,
        # The checkpoint's training settings: its data and validation part, so that ptanet evaluate
        # measures an exported model on the same split and threshold rules as its checkpoint.
        "training": (src.checkpoint.meta.get("settings") or None) if src.checkpoint else None,
    }


def _to_onnx_bytes(module: nn.Module, size: int, opset: int, dynamic_batch: bool) -> bytes:
    buf = io.BytesIO()
    dynamic_axes = {name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
    with warnings.catch_warnings():
        # We choose the TorchScript exporter on purpose (the dynamo one needs onnxscript and gains
        # nothing for a plain conv net); its deprecation notice is noise for our users.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, (torch.zeros(1, size, size, 3, dtype=torch.uint8),), buf, dynamo=False,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    return buf.getvalue()


@torch.inference_mode()
def _verify(path: Path, module: nn.Module, crops: np.ndarray, name: Path, feeds: dict | None = None) -> float:
    """Max |onnxruntime - exact| over both outputs (probabilities) on ``crops`` for the file at
    ``path``, where "exact" is the same module run in float64; raises (naming the target ``name``) if
    over tolerance. ``feeds``: extra inputs (the configuration index of a switchable file).

    The tolerance grows with PyTorch's own float32 error on this model: a barely trained model can
    hold BatchNorm variances near 1e-14, whose 1/sqrt(var + eps) magnifies rounding. A real mismatch
    (wrong statistics, branch or op) is off by the size of the outputs themselves.
    """
    single = [t.numpy() for t in module(torch.from_numpy(crops))]
    exact = [t.numpy() for t in copy.deepcopy(module).double()(torch.from_numpy(crops))]
    session = ortsession(path)
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(crops)  # a fixed-batch file runs crop by crop
    runs = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: crops[i:i + step], **(feeds or {})})
            for i in range(0, len(crops), step)]
    got = [np.concatenate(outs) for outs in zip(*runs)]
    for output, e, g in zip(OUTPUT_NAMES, exact, got):
        if e.shape != g.shape:
            raise RuntimeError(f"{name}: onnxruntime output {output!r} has shape {g.shape}, PyTorch {e.shape}")
    diff = max(float(np.max(np.abs(e - g))) for e, g in zip(exact, got))
    own = max(float(np.max(np.abs(e - s))) for e, s in zip(exact, single))  # PyTorch float32's own error
    tolerance = max(VERIFY_TOLERANCE, OWN_ERROR_FACTOR * own)  # outputs are probabilities: absolute
    if not diff < tolerance:
        raise RuntimeError(f"{name}: onnxruntime and PyTorch outputs differ by {diff:.3g} (PyTorch in float64; "
                           f"tolerance {tolerance:.3g}, PyTorch's own float32 error {own:.3g})")
    return diff


def _config_entry(module: nn.Module, config: str | None, size: int, meta: dict | None) -> dict:
    """What a device needs to choose a configuration: cost and recorded validation quality."""
    from ptanet.bench import count_macs, count_params  # ptflops is slow to import

    params, macs = count_params(module), count_macs(module, size)
    val = ((meta or {}).get("val") or {}).get(config or "No PTA")
    return {"config": config, "model": config_label(config), "params": params, "macs": macs,
            "mops": macs / 1e6, "val": val}


def export_onnx(
    checkpoint_path_or_model: str | os.PathLike | Checkpoint | MobileNetV2,
    out_path: str | os.PathLike,
    config: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    preprocess: dict | None = None,
    threshold: float | None = None,
) -> dict:
    """Export one configuration to ``out_path`` and verify it with onnxruntime.

    ``config`` defaults to the checkpoint's active configuration; it must be None for the No PTA
    baseline. ``preprocess`` overrides the stored settings (needed only for a bare model, which
    otherwise gets the paper's defaults). The file is written to a temporary name, verified, and only
    then renamed over ``out_path``: a failed or interrupted export never leaves a bad model there.

    Returns ``{path, config, model, opset, max_abs_diff, parity_data, size_bytes}``.
    """
    src = _source(checkpoint_path_or_model, preprocess)
    module, config = _static_module(src.model, config)
    return _export_static(module, config, src, Path(out_path), opset, dynamic_batch, threshold)


def _export_static(module: nn.Module, config: str | None, src: _Source, out_path: Path, opset: int,
                   dynamic_batch: bool, threshold: float | None = None, crops: tuple[np.ndarray, str] | None = None) -> dict:
    prep = Preprocess.from_dict(src.preprocess)
    wrapped = Deployable(module, prep).eval()
    proto = onnx.load_from_string(_to_onnx_bytes(wrapped, prep.size, opset, dynamic_batch))
    entry = _config_entry(module, config, prep.size, src.checkpoint.meta if src.checkpoint else None)
    onnx.helper.set_model_props(proto, _json_props(_metadata(config, src, dict(module.arch), prep.size, threshold, [entry])))
    proto.doc_string = f"ptanet {config_label(config)}: face anti-spoofing; uint8 RGB crops in, [live, spoof] out"
    onnx.checker.check_model(proto)
    crops, where = crops or parity_crops(src)

    diff = float("nan")

    def verify(tmp: Path) -> None:  # on the written bytes, before they replace out_path
        nonlocal diff
        diff = _verify(tmp, wrapped, crops, out_path)

    atomic_write(out_path, lambda f: f.write(proto.SerializeToString()), binary=True, check=verify)
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"path": str(out_path), "config": config, "model": config_label(config), "opset": opset_written,
            "max_abs_diff": diff, "parity_data": where, "size_bytes": out_path.stat().st_size,
            **{k: entry[k] for k in ("params", "macs", "mops", "val")}}


def onnx_filename(config: str | None) -> str:
    """``model_LHH.onnx`` for a configuration, ``model_baseline.onnx`` for No PTA."""
    return f"model_{config or 'baseline'}.onnx"


def _wanted_configs(src: _Source, configs: Iterable[str] | str | None) -> list[str | None]:
    if is_pta(src.model):
        if configs is None or isinstance(configs, str):
            return list(parse_configs(configs))
        wanted: list[str | None] = list(dict.fromkeys(parse_config(c, src.model.num_pta_blocks) for c in configs))
        if not wanted:
            raise ValueError("no configuration to export; give e.g. ['HHH', 'LLL'] or None for the paper's six")
        return wanted
    if configs:
        raise ValueError(f"{src.origin}: the model has no PTA blocks, so it has no configurations to export; "
                         "leave configs empty to export it as it is")
    return [None]


def export_all(
    checkpoint: str | os.PathLike | Checkpoint | MobileNetV2,
    out_dir: str | os.PathLike,
    configs: Iterable[str] | str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    threshold: float | None = None,
) -> dict:
    """Export one ``.onnx`` per configuration into ``out_dir`` plus ``manifest.json``.

    ``configs``: a list, or a spec for :func:`ptanet.models.parse_configs` ("paper", "all",
    "HHH,LLL"); None = the paper's six. For a model without PTA blocks (No PTA baseline, or a
    static checkpoint) it must be None and the one model is exported. The manifest lists each file
    with its parameters and multiply-adds (``ptanet.bench``), sorted fastest first, so a device can
    pick the best configuration its time budget allows. Returns the manifest.
    """
    src = _source(checkpoint, None)
    wanted = _wanted_configs(src, configs)
    size = Preprocess.from_dict(src.preprocess).size
    crops = parity_crops(src)
    out_dir = Path(out_dir)
    entries = []
    for config in wanted:
        module, canonical = _static_module(src.model, config)
        name = onnx_filename(canonical)
        result = _export_static(module, canonical, src, out_dir / name, opset, dynamic_batch, threshold, crops)
        del result["path"]  # the manifest travels with its folder: file names only
        entries.append({"file": name, **result, "params_m": result["params"] / 1e6})
    entries.sort(key=lambda e: e["macs"])
    manifest = {
        "format": "ptanet.onnx-manifest", "format_version": METADATA_VERSION, "source": src.origin,
        "input": {"name": INPUT_NAME, "shape": ["N", size, size, 3], "dtype": "uint8"},
        "outputs": list(OUTPUT_NAMES), "threshold": threshold,
        "preprocess": src.preprocess, "labels": {str(k): v for k, v in src.labels.items()},
        "models": entries,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest, indent=2)
    return manifest


# --- one switchable file ----------------------------------------------------------------------------
def _content_name(tensor: onnx.TensorProto) -> str:
    """A name from a tensor's type, shape and bytes: equal tensors of different exports get one name."""
    h = hashlib.sha1(bytes([tensor.data_type]) + str(list(tensor.dims)).encode())
    h.update(onnx.numpy_helper.to_array(tensor).tobytes())
    return f"w_{h.hexdigest()[:20]}"


def _as_branch(nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto],
               prefix: str, outer: set[str]) -> onnx.GraphProto:
    """Nodes of one static export as an ``If`` branch: no inputs (it reads ``outer`` names from the
    enclosing graph), its other names prefixed so branches cannot collide, and its own weights as
    the branch's initializers. Weights must live in the branch that uses them: onnxruntime pre-packs
    and fuses only initializers of the graph a node is in (measured: outer-scope weights ran the
    branches 2-4x slower than the static files)."""
    def name(n: str) -> str:
        return n if (not n or n in outer) else prefix + n

    new_nodes = []
    for node in nodes:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = prefix + node.name
        del new.input[:]
        new.input.extend(name(i) for i in node.input)
        del new.output[:]
        new.output.extend(name(o) for o in node.output)
        new_nodes.append(new)
    new_inits = []
    for init in inits:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = name(init.name)
        new_inits.append(t)
    return onnx.helper.make_graph(new_nodes, prefix + "branch", [], [_renamed(o, name(o.name)) for o in outputs],
                                  initializer=new_inits)


def _common_prefix(protos: list[onnx.ModelProto]) -> int:
    """How many leading nodes all exports share exactly (same op, attributes, inputs, and weights):
    the preprocessing and the layers before the first PTA block, computed once outside the ``If``."""
    inits = [{t.name: t for t in p.graph.initializer} for p in protos]

    def key(k: int, node: onnx.NodeProto) -> tuple:
        ins = tuple(_content_name(inits[k][i]) if i in inits[k] else i for i in node.input)
        return node.op_type, ins, tuple(node.output), tuple(a.SerializeToString() for a in node.attribute)

    n = 0
    while all(n < len(p.graph.node) for p in protos) and len({key(k, p.graph.node[n]) for k, p in enumerate(protos)}) == 1:
        n += 1
    return n


def build_switchable(protos: list[onnx.ModelProto], share_prefix: bool = True) -> onnx.ModelProto:
    """Merge static exports (same input and outputs) into one graph with an extra int64 scalar input
    ``config``: their common first layers (preprocessing and everything before the first PTA block)
    run once, then a chain of ``If`` nodes runs the rest of export number ``config`` (the last one for
    any larger index). Only the chosen branch executes, so a configuration costs what its static file
    costs; switching is a different input value, nothing is reloaded or rebuilt.

    ``share_prefix=False`` puts every layer inside its branch instead. ``ptanet bench --artifact``
    measures both: the same latency within noise, and the shared prefix holds less memory, so it is
    the default. The prefix weights are stored once in the weights file either way."""
    first = protos[0].graph
    n_common = _common_prefix(protos) if share_prefix else 0
    common_nodes = list(first.node[:n_common])
    common_values = {INPUT_NAME, *(o for node in common_nodes for o in node.output)}
    common_inits = {i for node in common_nodes for i in node.input} & {t.name for t in first.initializer}
    outs = [o.name for o in first.output]
    branches = []
    for k, p in enumerate(protos):
        rest = list(p.graph.node[n_common:])
        used = {i for node in rest for i in node.input}
        own = [t for t in p.graph.initializer if t.name in used]
        branches.append(_as_branch(rest, list(p.graph.output), own, f"c{k}/", common_values))

    def chain(k: int) -> tuple[list[onnx.NodeProto], list[str]]:
        """Nodes that produce the outputs of configurations k.. and their output names."""
        if k == len(branches) - 1:  # the last branch is the innermost else
            return [], [o.name for o in branches[k].output]
        names = [f"sel{k}/{o}" for o in outs]
        else_nodes, else_outs = chain(k + 1)
        if k + 1 == len(branches) - 1:
            else_graph = branches[k + 1]
        else:
            else_graph = onnx.helper.make_graph(
                [*else_nodes, *(onnx.helper.make_node("Identity", [s], [f"else{k}/{o}"]) for s, o in zip(else_outs, outs))],
                f"else{k}", [], [_renamed(v, f"else{k}/{o}") for v, o in zip(first.output, outs)])
        return [
            onnx.helper.make_node("Constant", [], [f"idx{k}"], value=onnx.numpy_helper.from_array(np.array(k, np.int64))),
            onnx.helper.make_node("Equal", [CONFIG_INPUT, f"idx{k}"], [f"is{k}"]),
            onnx.helper.make_node("If", [f"is{k}"], names, name=f"select{k}", then_branch=branches[k], else_branch=else_graph),
        ], names

    nodes, names = chain(0)
    nodes = common_nodes + nodes + [onnx.helper.make_node("Identity", [n], [o]) for n, o in zip(names, outs)]
    config_input = onnx.helper.make_tensor_value_info(CONFIG_INPUT, onnx.TensorProto.INT64, [])
    graph = onnx.helper.make_graph(nodes, "ptanet_switchable", [first.input[0], config_input], list(first.output),
                                   initializer=[t for t in first.initializer if t.name in common_inits])
    model = onnx.helper.make_model(graph, opset_imports=list(protos[0].opset_import),
                                   producer_name="ptanet", producer_version=ptanet.__version__)
    model.ir_version = protos[0].ir_version
    return model


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(value)
    vi.name = name
    return vi


def _switchable_parts(checkpoint, configs, opset: int):
    """The source, configurations, verified-against modules, graphs and metadata entries of a
    switchable export (one of each per configuration)."""
    src = _source(checkpoint, None)
    wanted = _wanted_configs(src, configs)
    if wanted == [None]:
        raise ValueError(f"{src.origin}: the model has no PTA blocks; a switchable artifact needs configurations "
                         "(export it with export_onnx)")
    prep = Preprocess.from_dict(src.preprocess)
    meta_ck = src.checkpoint.meta if src.checkpoint else None
    modules, protos, entries = [], [], []
    for config in wanted:
        module, canonical = _static_module(src.model, config)
        wrapped = Deployable(module, prep).eval()
        modules.append(wrapped)
        protos.append(onnx.load_from_string(_to_onnx_bytes(wrapped, prep.size, opset, True)))
        entries.append(_config_entry(module, canonical, prep.size, meta_ck))
    return src, wanted, modules, protos, entries


def export_switchable_folder(
    checkpoint: str | os.PathLike | Checkpoint | MobileNetV2,
    out_dir: str | os.PathLike,
    configs: Iterable[str] | str | None = None,
    opset: int = DEFAULT_OPSET,
    threshold: float | None = None,
) -> dict:
    """Export several configurations into one folder that switches between them at run time.

    Each configuration is the graph :func:`export_onnx` writes (its own BatchNorm statistics folded
    into its convolutions, the full metadata, so each graph is also a valid static file); all of them
    read their weights from one ``weights.bin`` (ONNX external data) in which every tensor equal
    across configurations is stored once. ``artifact.json`` lists the graphs;
    :class:`ptanet.runtime.DeployedModel` opens one session per graph and switches by choosing one.
    Against :func:`export_switchable`'s single file it runs each configuration as fast as its static
    file (no ``If`` dispatch) for a little more memory (README, Deployment). Every graph is verified
    against PyTorch on real crops before the manifest that publishes it is written; the previous
    export's files are removed only after that. Returns ``{path, configs, max_abs_diff, ...}``.
    """
    src, wanted, modules, protos, entries = _switchable_parts(checkpoint, configs, opset)
    prep = Preprocess.from_dict(src.preprocess)
    arch = {k: v for k, v in src.model.arch.items() if k != "config"}
    for config, proto in zip(wanted, protos):
        onnx.helper.set_model_props(proto, _json_props(_metadata(config, src, arch, prep.size, threshold, entries)))
        proto.doc_string = (f"ptanet {config_label(config)} of a switchable folder ({', '.join(wanted)}): face "
                            "anti-spoofing; uint8 RGB crops in, [live, spoof] out")
        onnx.checker.check_model(proto)
    crops, where = parity_crops(src)
    out_dir = Path(out_dir)
    diffs: dict[str, float] = {}

    def verify(graphs: dict[str, Path]) -> None:
        for config, wrapped in zip(wanted, modules):
            diffs[config] = _verify(graphs[config], wrapped, crops, out_dir / onnx_filename(config))

    size = write_shared_graphs(dict(zip(wanted, protos)), out_dir, verify)
    return {"path": str(out_dir), "configs": entries, "max_abs_diff": diffs, "parity_data": where,
            "size_bytes": size, "opset": opset}


EXTERNAL_MIN_BYTES = 1024  # smaller tensors (shapes, scalars) stay inside the graph


def _move_to_external(tensors: Iterable[onnx.TensorProto], location: str) -> list[bytes]:
    """Point every tensor of at least :data:`EXTERNAL_MIN_BYTES` at its place in one external-data
    file ``location`` (equal tensors, by content, at one place) and drop its bytes from the graph;
    returns the distinct blobs in file order, for :func:`_write_blobs`."""
    from onnx.external_data_helper import set_external_data

    blobs: dict[str, tuple[int, bytes]] = {}
    end = 0
    for t in tensors:
        if len(t.raw_data) < EXTERNAL_MIN_BYTES:
            continue
        key = _content_name(t)
        if key not in blobs:
            blobs[key] = (end, t.raw_data)
            end += len(t.raw_data) + (-len(t.raw_data)) % 64
        offset, data = blobs[key]
        set_external_data(t, location, offset, len(data))
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
    return [data for _, data in blobs.values()]


def _write_blobs(f, blobs: list[bytes]) -> None:
    for data in blobs:
        f.write(data + b"\0" * ((-len(data)) % 64))  # 64-byte aligned, as onnx's own writer does


def write_shared_graphs(protos: dict[str, onnx.ModelProto], out_dir: Path, check=None) -> int:
    """Write one graph per configuration into a new subfolder of ``out_dir``, with every weight
    tensor in one ``weights.bin`` beside them (each distinct tensor once), ``check`` the graphs, then
    publish them by writing ``out_dir/artifact.json`` atomically; returns the bytes written.

    The subfolder is named by the content, so a new export never touches the files the current
    manifest names: until the manifest is replaced, readers see the previous export whole, and a
    failed check leaves it in place. Older subfolders are removed once the new manifest is in place.
    """
    import shutil
    import tempfile

    out_dir.mkdir(parents=True, exist_ok=True)
    blobs = _move_to_external([t for proto in protos.values() for t in proto.graph.initializer], "weights.bin")
    serialized = {config: proto.SerializeToString() for config, proto in protos.items()}
    digest = hashlib.sha1()
    for config, data in serialized.items():
        digest.update(config.encode() + data)
    for data in blobs:
        digest.update(data)
    name = f"graphs-{digest.hexdigest()[:12]}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the graphs from a service running as another user
    try:
        with open(tmp / "weights.bin", "wb") as f:
            _write_blobs(f, blobs)
        for config, data in serialized.items():
            (tmp / onnx_filename(config)).write_bytes(data)
        if check is not None:
            check({config: tmp / onnx_filename(config) for config in serialized})
        final = out_dir / name
        if final.exists():  # the same export again: its files are already there
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "dir": name,
                "graphs": [{"config": config, "file": onnx_filename(config)} for config in serialized],
                "weights": "weights.bin"}
    write_json_atomic(out_dir / ARTIFACT_MANIFEST, manifest, indent=2)
    for old in out_dir.glob("graphs-*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return sum(p.stat().st_size for p in final.iterdir())


def export_switchable(
    checkpoint: str | os.PathLike | Checkpoint | MobileNetV2,
    out_path: str | os.PathLike,
    configs: Iterable[str] | str | None = None,
    opset: int = DEFAULT_OPSET,
    threshold: float | None = None,
    share_prefix: bool = True,
) -> dict:
    """Export several configurations into one ``.onnx`` file that switches between them at run time.

    Each configuration is exported as :func:`export_onnx` would (its own BatchNorm statistics folded
    into its convolutions) and becomes one branch of :func:`build_switchable`'s graph; tensors equal
    across configurations are stored once. Inputs: ``image`` (uint8 crops) and ``config`` (int64
    scalar, the index into the metadata's ``configs``; :class:`ptanet.runtime.DeployedModel` maps
    names to indices). Every configuration is verified against PyTorch on real crops before the file
    is published. ``configs``: as for :func:`export_all`; None = the paper's six. ``share_prefix``: see
    :func:`build_switchable`.
    """
    src, wanted, modules, protos, entries = _switchable_parts(checkpoint, configs, opset)
    prep = Preprocess.from_dict(src.preprocess)
    proto = build_switchable(protos, share_prefix)
    arch = {k: v for k, v in src.model.arch.items() if k != "config"}
    onnx.helper.set_model_props(proto, _json_props(
        _metadata(wanted[0], src, arch, prep.size, threshold, entries)))
    proto.doc_string = (f"ptanet switchable ({', '.join(wanted)}): face anti-spoofing; uint8 RGB crops and a "
                        "configuration index in, [live, spoof] out")
    onnx.checker.check_model(proto)
    crops, where = parity_crops(src)
    out_path = Path(out_path)
    diffs: dict[str, float] = {}

    def verify(tmp: Path) -> None:
        for k, (config, wrapped) in enumerate(zip(wanted, modules)):
            diffs[config] = _verify(tmp, wrapped, crops, out_path, {CONFIG_INPUT: np.array(k, np.int64)})

    weights = write_with_external_weights(proto, out_path, verify)
    return {"path": str(out_path), "weights": str(weights), "configs": entries, "max_abs_diff": diffs,
            "parity_data": where, "size_bytes": out_path.stat().st_size + weights.stat().st_size, "opset": opset}


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Initializers of a graph and of every subgraph in it (If branches)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def write_with_external_weights(proto: onnx.ModelProto, out_path: Path, check=None) -> Path:
    """Write ``proto`` as ``out_path`` plus one weights file beside it (ONNX external data), each
    distinct tensor stored once even where several ``If`` branches hold it.

    Why external data: onnxruntime keeps several copies of a graph's in-file tensors while it loads a
    model with subgraphs (measured on the paper's six configurations: 369 MB resident with the
    weights inside the file, 88 MB with them outside, against 122 MB for the six static files).
    The weights file is named by its content, so writing it never touches the weights a previous
    export's graph still reads; the graph is written atomically and ``check``-ed, and only then is
    an older weights file of the same graph removed. A failed check leaves the previous export whole.
    """
    import tempfile

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = list(_all_tensors(proto.graph))
    digest = hashlib.sha1()
    for key in dict.fromkeys(_content_name(t) for t in tensors if len(t.raw_data) >= EXTERNAL_MIN_BYTES):
        digest.update(key.encode())
    weights = out_path.with_name(f"{out_path.stem}.{digest.hexdigest()[:12]}.weights")
    blobs = _move_to_external(tensors, weights.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{weights.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_blobs(f, blobs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    previous = _weights_of(out_path)
    try:
        atomic_write(out_path, lambda f: f.write(proto.SerializeToString()), binary=True, check=check)
    except BaseException:
        if weights.name not in previous:
            weights.unlink(missing_ok=True)
        raise
    for name in previous - {weights.name}:
        (out_path.parent / name).unlink(missing_ok=True)
    return weights


def _weights_of(graph_path: Path) -> set[str]:
    """External-data files an existing graph file reads (empty if there is none or it is unreadable)."""
    try:
        proto = onnx.load(graph_path, load_external_data=False)
    except Exception:  # a missing or foreign file: nothing of ours to clean up
        return set()
    return {e.value for t in _all_tensors(proto.graph) for e in t.external_data if e.key == "location"}


# --- INT8 -------------------------------------------------------------------------------------------
# An INT8 file is kept only if, on real crops, its probabilities differ from the fp32 file's by at most
# this on average and at least INT8_AGREEMENT of the live/spoof labels (threshold 0.5) agree. Static
# INT8 moves the demo model's probabilities by ~0.012 on average (up to ~0.1 on single crops near the
# boundary, hence no bound on the maximum); a wrong calibration or a broken graph moves them by tenths.
INT8_TOLERANCE = 0.03
INT8_AGREEMENT = 0.95
# The kept settings, chosen by measurement (README, INT8: per-channel weights, U8 activations, S8
# weights, no reduce_range, the in-graph preprocessing and the first convolution left in fp32);
# bench.int8_options measures the others.
INT8_OPTIONS = {"per_channel": True, "activation": "U8", "weight": "S8", "reduce_range": False, "stem_fp32": True}
INT8_SUFFIX = ".int8.onnx"


def int8_crops(src: _Source, n: int = 128) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration and check crops: alternate rows of ``n`` real training crops (generated ones when
    the cache is unreachable), so the parity check never sees the calibration images."""
    crops, where = parity_crops(src, n)
    return crops[0::2], crops[1::2], where


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
                  check: np.ndarray, per_channel: bool = True, activation: str = "U8", weight: str = "S8",
                  reduce_range: bool = False, tolerance: float = INT8_TOLERANCE, depthwise_fp32: bool = False,
                  stem_fp32: bool = False, quant_format: str = "QDQ") -> dict:
    """Static quantization of an exported fp32 file, calibrated (min/max) on ``calibration`` crops
    (``stem_fp32``: the graph's preprocessing and first convolution stay fp32, see below;
    ``depthwise_fp32``: the depthwise convolutions stay fp32; ``quant_format``: "QDQ" or
    "QOperator", whose QLinearConv nodes onnxruntime runs without the QDQ fusion pass). Written only
    if its probabilities on ``check`` crops differ from the fp32 file's by at most ``tolerance`` on
    average, with at least :data:`INT8_AGREEMENT` of the labels equal. Returns ``{path,
    max_abs_diff, mean_abs_diff, label_agreement, size_bytes, options}``."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    types = {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}
    if activation not in types or weight not in types:
        raise ValueError(f"activation and weight types are U8 or S8, got {activation!r}, {weight!r}")

    class Crops(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    options = {"per_channel": per_channel, "activation": activation, "weight": weight, "reduce_range": reduce_range}
    if quant_format not in ("QDQ", "QOperator"):
        raise ValueError(f"quant_format is QDQ or QOperator, got {quant_format!r}")
    if quant_format != "QDQ":
        options["format"] = quant_format
    graph = onnx.load(fp32_path, load_external_data=False).graph
    excluded: list[str] = []
    if stem_fp32:
        # Quantized, the normalisation becomes QLinearMul/QLinearAdd, and onnxruntime's NHWC layout
        # for QLinearConv pushes the input transpose behind it, so it runs over a trailing axis of 3:
        # about a third of an INT8 run here. Left in fp32 up to the first convolution (3 input
        # channels, 3 % of the multiply-adds), it stays in NCHW and a single QuantizeLinear follows.
        first_conv = next(i for i, n in enumerate(graph.node) if n.op_type == "Conv")
        excluded += [n.name for n in graph.node[:first_conv + 1]]
        options["stem_fp32"] = True
    if depthwise_fp32:
        options["depthwise_fp32"] = True
        excluded += [n.name for n in graph.node if n.op_type == "Conv"
                     and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    extra = {"nodes_to_exclude": excluded} if excluded else {}
    with tempfile.TemporaryDirectory(prefix="ptanet-int8-") as tmp:
        raw = Path(tmp) / "q.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantizer's advice to pre-process first (measured: no gain here)
            quantize_static(str(fp32_path), str(raw), Crops(), quant_format=getattr(QuantFormat, quant_format),
                            per_channel=per_channel,
                            activation_type=types[activation], weight_type=types[weight], reduce_range=reduce_range,
                            **extra)
        proto = onnx.load(raw)
    fp32 = onnx.load(fp32_path, load_external_data=False)
    props = {p.key: p.value for p in fp32.metadata_props}
    props["quantization"] = json.dumps({"method": f"onnxruntime static {quant_format}, min/max calibration",
                                        "calibration_crops": len(calibration), **options}, sort_keys=True)
    onnx.helper.set_model_props(proto, props)
    expected = ortsession(fp32_path).run([OUTPUT_NAMES[0]], {INPUT_NAME: check})[0]
    result: dict = {}

    def verify(tmp_file: Path) -> None:
        got = ortsession(tmp_file).run([OUTPUT_NAMES[0]], {INPUT_NAME: check})[0]
        diff = np.abs(got - expected)
        result.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                      label_agreement=float(np.mean((got[:, 1] >= 0.5) == (expected[:, 1] >= 0.5))))
        if not (result["mean_abs_diff"] <= tolerance and result["label_agreement"] >= INT8_AGREEMENT):
            raise RuntimeError(f"{out_path}: INT8 and fp32 probabilities differ by {result['mean_abs_diff']:.3g} on "
                               f"average on {len(check)} crops (tolerance {tolerance:.3g}), labels agree on "
                               f"{100 * result['label_agreement']:.1f} % (need {100 * INT8_AGREEMENT:.0f} %); not written")

    def write(f) -> None:  # the parity measured on the bytes written, recorded in them for reports
        onnx.helper.set_model_props(proto, {**props, "int8_parity": json.dumps(result)})
        f.write(proto.SerializeToString())

    # Two passes: verify needs the graph on disk before the parity it measures can be recorded.
    import tempfile
    with tempfile.TemporaryDirectory(prefix="ptanet-int8-") as tmp:
        first = Path(tmp) / "q.onnx"
        first.write_bytes(proto.SerializeToString())
        verify(first)
    atomic_write(out_path, write, binary=True)
    return {"path": str(out_path), **result, "size_bytes": out_path.stat().st_size, "options": options}


def export_int8(checkpoint: str | os.PathLike | Checkpoint | MobileNetV2, out_dir: str | os.PathLike,
                configs: Iterable[str] | str | None = None, tolerance: float = INT8_TOLERANCE,
                **options) -> list[dict]:
    """For each configuration, ``model_<CONFIG>.onnx`` (fp32, as :func:`export_all`) and
    ``model_<CONFIG>.int8.onnx``, calibrated on that configuration's own activations (each
    configuration's ranges differ) over real training crops and kept only within ``tolerance``.
    ``options``: :data:`INT8_OPTIONS` keys to override."""
    src = _source(checkpoint, None)
    calibration, check, where = int8_crops(src)
    out_dir = Path(out_dir)
    results = []
    for config in _wanted_configs(src, configs):
        module, canonical = _static_module(src.model, config)
        fp32 = out_dir / onnx_filename(canonical)
        _export_static(module, canonical, src, fp32, DEFAULT_OPSET, True, crops=(check, where))
        result = quantize_int8(fp32, fp32.with_name(fp32.name.replace(".onnx", INT8_SUFFIX)), calibration, check,
                               tolerance=tolerance, **{**INT8_OPTIONS, **options})
        results.append({"config": canonical, "model": config_label(canonical), **result, "parity_data": where})
    return results
