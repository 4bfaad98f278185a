"""The spoof decision threshold a model file carries, and which one applies to a configuration.

A model decides spoof iff its spoof score >= threshold (as ``ptanet.metrics`` counts errors). The
threshold travels with the model: ``meta["threshold"]`` of a checkpoint, the ``threshold`` metadata
of an exported file (the same JSON). Two forms are written:

- ``{"value", "rule", "data", "n", "config"}``: one threshold for every configuration, chosen on one
  configuration's scores (``ptanet calibrate`` on the user's own camera images);
- ``{"per_config": {"HHH": t, "LLL": t, ...}, "value", "rule", "data", "n"}``: one per configuration,
  each chosen on that configuration's out-of-fold cross-validation scores (``ptanet train
  --threshold-from CV_DIR``, ``ptanet cv --final``); ``"No PTA"`` keys the baseline. A configuration
  the file lists no threshold for takes ``value`` (the selection configuration's).

A bare number (older files, hand-written metadata) is one threshold for all. Pure Python: the
deployment runtime reads it without PyTorch.
"""

from __future__ import annotations

import math
from typing import Any

DEFAULT_THRESHOLD = 0.5
BASELINE_KEY = "No PTA"


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0.0 <= value <= 1.0


def check_threshold(stored: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``stored`` is None or one of the forms above."""
    if stored is None or _is_probability(stored):
        return
    if isinstance(stored, dict):
        values = [stored.get("value")] if "value" in stored else []
        per_config = stored.get("per_config", {})
        if isinstance(per_config, dict) and (values or per_config):
            values += list(per_config.values())
            if all(_is_probability(v) for v in values):
                return
    raise ValueError(f"{where}: stored threshold {stored!r} is not a number in [0, 1] "
                     "nor a {'value': ..., 'per_config': {...}} record of such numbers")


def threshold_for(stored: Any, config: str | None, where: str = "model") -> float | None:
    """The stored threshold that applies to ``config`` (None: the No PTA baseline), or None when the
    file stores none that applies."""
    check_threshold(stored, where)
    if stored is None or _is_probability(stored):
        return None if stored is None else float(stored)
    per_config = stored.get("per_config") or {}
    key = BASELINE_KEY if config is None else config
    value = per_config.get(key, stored.get("value"))
    return None if value is None else float(value)


def describe(stored: Any) -> str:
    """Where a stored threshold came from, for tables: "<rule> on <data>"."""
    if isinstance(stored, dict):
        return f"{stored.get('rule') or 'stored'} on {stored.get('data') or 'unrecorded data'}"
    return "stored on unrecorded data"
