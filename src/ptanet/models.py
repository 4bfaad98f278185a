"""MobileNetV2 (the "No PTA" baseline) and MobileNetV2 with Post-Train Adaptive blocks.

Both are built from one architecture table that reads like paper Table 1. The PTA model exposes
switching as an API (once-for-all style): ``set_config``, ``config``, ``using`` and ``to_static``.

A *configuration* (``ptanet.configs``) is one letter per PTA block, ``H`` (heavy), ``L`` (light) or
``B`` (both, averaged), e.g. ``"LHH"``. ``HHH`` has exactly MobileNetV2's layers, parameters and
multiply-adds.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ptanet.blocks import BothBranches, ConvBNReLU, InvertedResidual, PTABlock
from ptanet.configs import NUM_PTA_BLOCKS, parse_config


@dataclass(frozen=True)
class Stage:
    """One row of the architecture table: ``n`` blocks of ``kind`` with ``c`` output channels,
    expansion ratio ``t``; the first block of the row has stride ``s``."""

    kind: str  # "ir" (Inverted Residual) or "pta" (Post-Train Adaptive)
    t: int
    c: int
    n: int
    s: int


# Paper Table 1. The three widest pairs of Inverted Residual blocks (64, 96 and 160 channels) are
# replaced by PTA blocks; each PTA block's Heavy branch is exactly the pair it replaces.
PTA_MOBILENET_V2_TABLE: tuple[Stage, ...] = (
    #     kind   t    c   n  s
    Stage("ir", 1, 16, 1, 1),
    Stage("ir", 6, 24, 2, 2),
    Stage("ir", 6, 32, 3, 2),
    Stage("ir", 6, 64, 2, 2),
    Stage("pta", 6, 64, 1, 1),
    Stage("ir", 6, 96, 1, 1),
    Stage("pta", 6, 96, 1, 1),
    Stage("ir", 6, 160, 1, 2),
    Stage("pta", 6, 160, 1, 1),
    Stage("ir", 6, 320, 1, 1),
)

# MobileNetV2 as in torchvision (and the MobileNetV2 paper's Table 2).
MOBILENET_V2_TABLE: tuple[Stage, ...] = (
    Stage("ir", 1, 16, 1, 1),
    Stage("ir", 6, 24, 2, 2),
    Stage("ir", 6, 32, 3, 2),
    Stage("ir", 6, 64, 4, 2),
    Stage("ir", 6, 96, 3, 1),
    Stage("ir", 6, 160, 3, 2),
    Stage("ir", 6, 320, 1, 1),
)

if sum(s.n for s in PTA_MOBILENET_V2_TABLE if s.kind == "pta") != NUM_PTA_BLOCKS:
    raise AssertionError("PTA_MOBILENET_V2_TABLE must hold configs.NUM_PTA_BLOCKS PTA blocks")


# channels_last runs MobileNetV2's depthwise convolutions faster on CPU (measured on 2 cores: training
# 35 -> 48 images/s, evaluation 120 -> 180 images/s). It changes memory layout only.
CHANNELS_LAST = torch.channels_last


def to_fast_layout(model: nn.Module) -> nn.Module:
    return model.to(memory_format=CHANNELS_LAST)


def _make_divisible(v: float, divisor: int = 8) -> int:
    # torchvision's rounding of channel counts under a width multiplier.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def build_features(table: tuple[Stage, ...], width_mult: float = 1.0, last_channel: int = 1280) -> nn.Sequential:
    """The feature extractor for an architecture table: stem, the table's blocks, 1x1 head conv."""
    inp = _make_divisible(32 * width_mult)
    layers: list[nn.Module] = [ConvBNReLU(3, inp, stride=2)]
    for st in table:
        out = _make_divisible(st.c * width_mult)
        for i in range(st.n):
            if st.kind == "ir":
                layers.append(InvertedResidual(inp, out, st.s if i == 0 else 1, st.t))
            elif st.kind == "pta":
                if inp != out or st.s != 1:
                    raise ValueError(f"a PTA block needs stride 1 and in == out channels, got {st}")
                layers.append(PTABlock(out, st.t))
            else:
                raise ValueError(f"unknown block kind {st.kind!r} in {st}")
            inp = out
    layers.append(ConvBNReLU(inp, _make_divisible(last_channel * max(1.0, width_mult)), kernel_size=1))
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    # torchvision's MobileNetV2 initialisation, so training from scratch matches the reference.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class MobileNetV2(nn.Module):
    """A MobileNetV2-shaped classifier: ``features`` then global average pool then ``classifier``.

    Parameter names equal torchvision's ``mobilenet_v2`` (``features.N...``, ``classifier.1...``).
    ``arch`` records how to rebuild the model (checkpoints store it).
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, arch: dict) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.arch = dict(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # Functional pool: ptflops then counts it once (see ptanet.bench), and ONNX gets a GlobalAveragePool.
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class PTAMobileNetV2(MobileNetV2):
    """MobileNetV2 with PTA blocks whose configuration is switched after training, at run time.

    Optionally it holds BatchNorm running statistics per configuration (see :meth:`set_bn_stats`):
    every BatchNorm from the first PTA block on sees features whose distribution depends on the
    configuration, so statistics averaged over the training mix fit rarely- or never-trained
    configurations badly. ``set_config`` swaps them in with the branches, by reference.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, arch: dict) -> None:
        super().__init__(features, classifier, arch)
        self.pta_blocks: list[PTABlock] = [m for m in features if isinstance(m, PTABlock)]
        if not self.pta_blocks:
            raise ValueError("a PTA model needs at least one PTA block")
        first = next(i for i, m in enumerate(features) if isinstance(m, PTABlock))
        # The BatchNorms whose inputs depend on the configuration, by state-dict prefix.
        self._adaptive_bns: dict[str, nn.BatchNorm2d] = {
            f"features.{i}.{name}": bn
            for i in range(first, len(features))
            for name, bn in features[i].named_modules()
            if isinstance(bn, nn.BatchNorm2d)
        }
        self._bn_stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._shared_bn: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._config = "H" * len(self.pta_blocks)
        self.set_config(self._config)

    # --- configuration API ---------------------------------------------------------------------
    @property
    def num_pta_blocks(self) -> int:
        return len(self.pta_blocks)

    @property
    def config(self) -> str:
        """The active configuration, e.g. ``"LHH"``."""
        return self._config

    def set_config(self, config: str) -> "PTAMobileNetV2":
        """Activate ``config``: set each PTA block's mode and, if stored, its BatchNorm statistics.

        Costs attribute writes only (no copies, no allocation). Returns ``self`` for chaining.
        """
        config = parse_config(config, self.num_pta_blocks)
        for block, mode in zip(self.pta_blocks, config):
            block.mode = mode
        self._config = config
        if self._shared_bn is not None:
            self._install_bn(self._bn_stats.get(config, self._shared_bn))
        return self

    @contextlib.contextmanager
    def using(self, config: str) -> Iterator["PTAMobileNetV2"]:
        """Temporarily run ``config``: ``with model.using("LLL"): model(x)``."""
        previous = self._config
        self.set_config(config)
        try:
            yield self
        finally:
            self.set_config(previous)

    # --- per-configuration BatchNorm statistics --------------------------------------------------
    def _install_bn(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, bn in self._adaptive_bns.items():
            # Assigning to a registered buffer name rebinds the buffer: a pointer swap.
            bn.running_mean, bn.running_var = stats[name]

    def _current_bn(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (bn.running_mean, bn.running_var) for n, bn in self._adaptive_bns.items()}

    @property
    def bn_configs(self) -> list[str]:
        """Configurations that have their own BatchNorm statistics."""
        return sorted(self._bn_stats)

    def set_bn_stats(self, config: str, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store BatchNorm statistics (``{bn_name: (running_mean, running_var)}``) for ``config``."""
        config = parse_config(config, self.num_pta_blocks)
        missing = set(self._adaptive_bns) - set(stats)
        if missing:
            raise ValueError(f"BatchNorm statistics for {config} miss {len(missing)} layers, e.g. {sorted(missing)[0]}")
        if self._shared_bn is None:
            self._shared_bn = self._current_bn()  # what training produced, kept for other configs
        self._bn_stats[config] = {n: (stats[n][0], stats[n][1]) for n in self._adaptive_bns}
        self.set_config(self._config)

    def bn_stats(self) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """All stored per-configuration statistics (references)."""
        return dict(self._bn_stats)

    def clear_bn_stats(self) -> None:
        """Drop per-configuration statistics and reinstall the shared (trained) ones.

        Training must start from here: BatchNorm updates its running statistics in place, and
        must never write into one configuration's stored statistics.
        """
        if self._shared_bn is not None:
            self._install_bn(self._shared_bn)
        self._bn_stats.clear()
        self._shared_bn = None

    @property
    def adaptive_bn_names(self) -> list[str]:
        return list(self._adaptive_bns)

    @property
    def adaptive_bns(self) -> dict[str, nn.BatchNorm2d]:
        """The BatchNorm layers whose statistics depend on the configuration, by name."""
        return dict(self._adaptive_bns)

    def _apply(self, fn, recurse: bool = True):
        # Stored statistics are plain tensors, not buffers: move them with the model (.to("cuda"), ...)
        # and reinstall the active ones, so that set_config never mixes devices.
        super()._apply(fn, recurse)
        if self._shared_bn is not None:
            self._shared_bn = {n: (fn(m), fn(v)) for n, (m, v) in self._shared_bn.items()}
            self._bn_stats = {c: {n: (fn(m), fn(v)) for n, (m, v) in s.items()} for c, s in self._bn_stats.items()}
            self.set_config(self._config)
        return self

    @contextlib.contextmanager
    def _shared_bn_installed(self) -> Iterator[None]:
        if self._shared_bn is None:
            yield
            return
        self._install_bn(self._shared_bn)
        try:
            yield
        finally:
            self.set_config(self._config)

    def state_dict(self, *args, **kwargs):
        # The state dict always holds the shared statistics, whatever configuration is active,
        # so it stays a plain MobileNetV2-style state dict; per-config ones are saved separately.
        with self._shared_bn_installed():
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_bn_stats()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.set_config(self._config)
        return result

    # --- static export ------------------------------------------------------------------------
    def to_static(self, config: str | None = None, fold_average: bool = True) -> MobileNetV2:
        """A plain MobileNetV2-shaped module holding only ``config``'s branches (default: the active
        one), with that configuration's BatchNorm statistics and identical outputs.

        The result is an independent copy: for export and deployment, where no switching is wanted.
        ``fold_average``: a ``B`` block's 0.5 goes into the next convolution's weights
        (:func:`fold_both_averages`); its ``arch`` records it so that a saved static model rebuilds.
        """
        config = self._config if config is None else parse_config(config, self.num_pta_blocks)
        with self.using(config):
            layers: list[nn.Module] = []
            for m in self.features:
                if isinstance(m, PTABlock):
                    if m.mode == "H":
                        layers.append(copy.deepcopy(m.heavy))
                    elif m.mode == "L":
                        layers.append(copy.deepcopy(m.light))
                    else:
                        layers.append(BothBranches(copy.deepcopy(m.light), copy.deepcopy(m.heavy)))
                else:
                    layers.append(copy.deepcopy(m))
            arch = {**self.arch, "config": config}
            if fold_average and fold_both_averages(layers):
                arch["average_folded"] = True
            static = MobileNetV2(nn.Sequential(*layers), copy.deepcopy(self.classifier), arch)
        static.train(self.training)
        return static


def fold_both_averages(layers: list[nn.Module]) -> int:
    """Move the 0.5 of each ``BothBranches`` average into the first convolution of the block after
    it, in place; returns how many were moved.

    Why: onnxruntime runs these convolutions in its blocked (NCHWc) CPU layout, which has no Mul, so
    an explicit 0.5 costs a conversion out of that layout and back around it at every B block (BBB
    measured about 1 % slower for it in ``ptanet bench``). In paper Table 1 the block after each PTA
    block changes the channel count (no residual) and starts with a bias-free convolution, which is
    linear: ``conv(w, 0.5 s) == conv(0.5 w, s)``, exactly in floating point since halving is exact.
    """
    moved = 0
    for i, both in enumerate(layers[:-1]):
        nxt = layers[i + 1]
        if not (isinstance(both, BothBranches) and both.scale == 0.5 and isinstance(nxt, InvertedResidual)
                and not nxt.use_res_connect and isinstance(nxt.conv[0], ConvBNReLU) and nxt.conv[0][0].bias is None):
            continue
        with torch.no_grad():
            nxt.conv[0][0].weight.mul_(0.5)
        both.scale = 1.0
        moved += 1
    return moved


def _classifier(last_channel: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))


def mobilenet_v2(num_classes: int = 2, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """The "No PTA" baseline: torchvision's MobileNetV2 (same names and shapes)."""
    features = build_features(MOBILENET_V2_TABLE, width_mult)
    arch = {"name": "mobilenet_v2", "num_classes": num_classes, "width_mult": width_mult, "dropout": dropout}
    model = MobileNetV2(features, _classifier(features[-1].out_channels, num_classes, dropout), arch)
    _init_weights(model)
    return model


def pta_mobilenet_v2(num_classes: int = 2, width_mult: float = 1.0, dropout: float = 0.2) -> PTAMobileNetV2:
    """MobileNetV2 with three PTA blocks (paper Table 1)."""
    features = build_features(PTA_MOBILENET_V2_TABLE, width_mult)
    arch = {"name": "pta_mobilenet_v2", "num_classes": num_classes, "width_mult": width_mult, "dropout": dropout}
    model = PTAMobileNetV2(features, _classifier(features[-1].out_channels, num_classes, dropout), arch)
    _init_weights(model)
    return model


# The one registry of architecture names: checkpoints, settings and the CLI all read it.
MODELS: dict[str, Callable[..., MobileNetV2]] = {
    "pta_mobilenet_v2": pta_mobilenet_v2,
    "mobilenet_v2": mobilenet_v2,
}
PTA_ARCHS = frozenset({"pta_mobilenet_v2"})


def list_models() -> list[str]:
    return list(MODELS)


def check_arch(name: str) -> str:
    """``name`` if it is a registered architecture, else a ValueError listing them."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return name


def create_model(name: str, **overrides) -> MobileNetV2:
    """Build a model by name (see :func:`list_models`); ``overrides`` go to its builder."""
    return MODELS[check_arch(name)](**overrides)


def is_pta(model: nn.Module) -> bool:
    """A switchable PTA model (not the baseline, not a static export of one configuration)."""
    return isinstance(model, PTAMobileNetV2)


def is_pta_arch(name: str) -> bool:
    """Whether the architecture ``name`` builds a switchable PTA model."""
    return check_arch(name) in PTA_ARCHS


def held_config(model: nn.Module) -> str | None:
    """The configuration a model runs: the active one of a PTA model, the one a static (exported)
    model was reduced to, None for the No PTA baseline."""
    return model.config if is_pta(model) else model.arch.get("config")


# --- MobileNetV2 weights into a PTA model ---------------------------------------------------------
def _unit_prefixes(features: nn.Sequential) -> list[str]:
    """State-dict prefixes of the model's units in order: the stem, every Inverted Residual block
    (a PTA block's Heavy branch contributes its two), the head conv."""
    prefixes = []
    for i, m in enumerate(features):
        if isinstance(m, PTABlock):
            prefixes += [f"features.{i}.heavy.{j}" for j in range(len(m.heavy))]
        else:
            prefixes.append(f"features.{i}")
    return prefixes


def mobilenet_v2_to_pta_state_dict(state_dict: dict[str, torch.Tensor], model: PTAMobileNetV2) -> dict[str, torch.Tensor]:
    """Map a MobileNetV2 state dict (torchvision names) onto ``model``'s names.

    Each replaced pair of Inverted Residual blocks lands in its PTA block's Heavy branch; Light
    branches keep their own (fresh) weights. So ``pta.set_config("HHH")`` then computes exactly
    what the source MobileNetV2 computed. Load the result with ``strict=False`` or merge it.
    """
    src = _unit_prefixes(build_features(MOBILENET_V2_TABLE, model.arch.get("width_mult", 1.0)))
    dst = _unit_prefixes(model.features)
    if len(src) != len(dst):
        raise ValueError(f"architecture mismatch: MobileNetV2 has {len(src)} units, the PTA model {len(dst)}")
    rename = dict(zip(src, dst))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            out[key] = value
            continue
        parts = key.split(".")
        prefix = ".".join(parts[:2])
        if prefix not in rename:
            raise ValueError(f"unexpected key {key!r} in a MobileNetV2 state dict")
        out[".".join([rename[prefix], *parts[2:]])] = value
    return out


def load_mobilenet_v2_weights(model: PTAMobileNetV2, state_dict: dict[str, torch.Tensor]) -> None:
    """Initialise ``model``'s Heavy branches and shared layers from MobileNetV2 weights."""
    mapped = mobilenet_v2_to_pta_state_dict(state_dict, model)
    expected = model.state_dict()
    for key, value in mapped.items():
        if key not in expected:
            raise ValueError(f"mapped key {key!r} does not exist in the PTA model")
        if expected[key].shape != value.shape:
            raise ValueError(f"shape mismatch for {key}: {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
    model.load_state_dict({**expected, **mapped})
