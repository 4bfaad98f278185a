"""PTA configurations: what they are, how they are written, which the paper uses, how training draws them.

A *configuration* is one letter per PTA block, ``H`` (heavy), ``L`` (light) or ``B`` (both, averaged),
e.g. ``"LHH"``; with three PTA blocks there are 27. Parsing, the paper's lists and the Table 2 sampling
live here, once; applying a configuration is ``PTAMobileNetV2.set_config`` (once-for-all's
set/sample/get: ``set_config``, ``ConfigSampler.sample``, ``model.config``).

Pure Python and numpy: a deployment that only reads configuration names needs nothing else.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np

# The three things a PTA block can execute (paper Section 5).
MODES = ("H", "L", "B")
# PTA blocks of PTA-MobileNetV2 (paper Table 1); models.py checks its table against it.
NUM_PTA_BLOCKS = 3
# The configurations the paper reports (Tables 3 and 4), in its order.
PAPER_CONFIGS: tuple[str, ...] = ("HHH", "LHH", "HLH", "HHL", "LLL", "BBB")
# Paper Table 2: configurations sampled during training and their probabilities (B is never trained).
PAPER_SAMPLING: dict[str, float] = {"HHH": 0.45, "LHH": 0.15, "HLH": 0.15, "HHL": 0.15, "LLL": 0.10}
BASELINE_LABEL = "No PTA"


def config_label(config: str | None) -> str:
    """Row label used in every table: ``"No PTA"`` for the baseline, ``"PTA-LHH"`` otherwise."""
    return BASELINE_LABEL if config is None else f"PTA-{config}"


def all_configs(num_blocks: int = NUM_PTA_BLOCKS) -> list[str]:
    """Every configuration (3**num_blocks of them), heavy-first order: HHH, HHL, HHB, HLH, ..."""
    return ["".join(p) for p in itertools.product(MODES, repeat=num_blocks)]


def parse_config(text: str, num_blocks: int = NUM_PTA_BLOCKS) -> str:
    """Validate a configuration string and return its canonical form (upper case, no prefix).

    Accepts ``"LHH"``, ``"lhh"`` and ``"PTA-LHH"`` (the table label). Anything else raises a
    ValueError that says what is allowed.
    """
    if not isinstance(text, str):
        raise ValueError(f"configuration must be a string like 'HHH', got {type(text).__name__}")
    s = text.strip().upper()
    if s.startswith("PTA-"):
        s = s[4:]
    if len(s) != num_blocks or any(ch not in MODES for ch in s):
        raise ValueError(
            f"invalid PTA configuration {text!r}: expected {num_blocks} letters, one per PTA block, "
            f"each H (heavy), L (light) or B (both), e.g. {'H' * num_blocks!r} or "
            f"{'L' + 'H' * (num_blocks - 1)!r}"
        )
    return s


def parse_configs(spec: str | Iterable[str] | None) -> list[str]:
    """A list of configurations: ``None`` or ``"paper"`` -> the paper's six, ``"all"`` -> all 27,
    ``"none"`` -> none, a comma-separated string or a list -> each validated by :func:`parse_config`."""
    if spec is None:
        return list(PAPER_CONFIGS)
    if isinstance(spec, str):
        word = spec.strip().lower()
        if word == "paper":
            return list(PAPER_CONFIGS)
        if word == "all":
            return all_configs()
        if word == "none":
            return []
        configs = [parse_config(c) for c in spec.split(",") if c.strip()]
        if not configs:
            raise ValueError(f"no configuration in {spec!r}; use 'paper', 'all', 'none' or a list like 'HHH,LLL'")
        return list(dict.fromkeys(configs))
    return list(dict.fromkeys(parse_config(c) for c in spec))


def parse_sampling(spec: str | dict[str, float]) -> dict[str, float]:
    """A training distribution: ``{"HHH": 0.45, ...}`` or ``"HHH=0.45,LHH=0.15"``; weights need not sum to 1."""
    if isinstance(spec, str):
        pairs = {}
        for part in spec.split(","):
            name, sep, weight = part.partition("=")
            if not sep:
                raise ValueError(f"sampling: expected CONFIG=WEIGHT pairs, got {part!r}")
            pairs[name.strip()] = weight
        spec = pairs
    try:
        weights = {parse_config(c): float(w) for c, w in spec.items()}
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"sampling must map configurations to weights, got {spec!r} ({exc})") from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"sampling weights must be non-negative with a positive sum, got {weights}")
    return weights


class ConfigSampler:
    """Draws one PTA configuration per iteration from a weighted distribution, with its own
    generator (never the global RNGs that shuffle data or drive dropout)."""

    def __init__(self, weights: dict[str, float], seed: Iterable[int] | int) -> None:
        weights = parse_sampling(weights)
        self.configs = list(weights)
        p = np.asarray(list(weights.values()), dtype=np.float64)
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)
        self.counts = {c: 0 for c in self.configs}

    def sample(self) -> str:
        config = self.configs[self.rng.choice(len(self.configs), p=self.p)]
        self.counts[config] += 1
        return config
