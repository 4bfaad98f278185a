"""The inference runtime of exported models: ONNX Runtime and numpy only, never torch.

``ortsession`` opens an exported file with the session options ptanet always wants, and
``read_metadata`` reads the ptanet metadata every export carries (preprocessing, label map,
configurations), so a deployment needs the ``.onnx`` file, onnxruntime and numpy, nothing else.
``DeployedModel`` runs a static or switchable file on uint8 face crops and switches configuration;
``pareto_front`` / ``select_config`` choose a configuration for a latency budget from measured rows,
and ``AdaptiveController`` keeps a budget under changing load. All three are pure functions of the
numbers they are given (no timing inside), so they are tested on given latency traces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ptanet.configs import parse_config  # pure Python and numpy
from ptanet.threshold import DEFAULT_THRESHOLD, check_threshold, threshold_for  # pure Python

INPUT_NAME = "image"  # uint8 (N, S, S, 3) RGB face crops, as Preprocess.crop returns them
CONFIG_INPUT = "config"  # int64 scalar: index into the metadata's "configs" (switchable artifacts only)
OUTPUT_NAMES = ("probabilities", "spoof_score")  # (N, 2) [live, spoof] and (N,) P(spoof)
METADATA_FORMAT = "ptanet.onnx"
# 2: uint8 NHWC input with the normalisation inside the graph, probabilities out. Version 1 files took
# normalised float NCHW input; feeding them crops would silently give wrong scores, so they are refused.
METADATA_VERSION = 2
# A switchable folder: one graph per configuration, all reading one weights file, listed by this manifest.
ARTIFACT_MANIFEST = "artifact.json"
ARTIFACT_FORMAT = "ptanet.switchable-graphs"
ARTIFACT_VERSION = 1
ONNX_SUFFIX = ".onnx"


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (an ``.onnx`` file or a switchable folder), not a checkpoint."""
    path = Path(path)
    return (path.suffix.lower() == ONNX_SUFFIX or path.name == ARTIFACT_MANIFEST
            or (path.is_dir() and (path / ARTIFACT_MANIFEST).is_file()))


def read_artifact(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """The (configuration, graph file) pairs of a switchable folder (or of its ``artifact.json``), in
    the manifest's order. Raises ValueError naming the folder if it is not one, or is incomplete."""
    path = Path(path)
    manifest = path if path.name == ARTIFACT_MANIFEST else path / ARTIFACT_MANIFEST
    if not manifest.is_file():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        raise ValueError(f"{path}: not a ptanet switchable folder (no {ARTIFACT_MANIFEST})")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{manifest}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{manifest}: not a ptanet switchable-folder manifest (format {ARTIFACT_FORMAT!r})")
    if data.get("format_version") != ARTIFACT_VERSION:
        raise ValueError(f"{manifest}: switchable-folder version {data.get('format_version')!r}, this ptanet "
                         f"reads version {ARTIFACT_VERSION} only; export the checkpoint again with this ptanet")
    try:
        graphs = [(str(g["config"]), manifest.parent / str(data["dir"]) / str(g["file"])) for g in data["graphs"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{manifest}: corrupt manifest (missing {exc})") from None
    if not graphs:
        raise ValueError(f"{manifest}: the manifest lists no graphs")
    for config, graph in graphs:
        if not graph.is_file():
            raise ValueError(f"{manifest}: the graph of {config}, {graph}, is missing (copy the whole folder)")
    return graphs


OPTIMIZATION_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def ortsession(path: str | os.PathLike, threads: int = 1, optimization: str = "all") -> ort.InferenceSession:
    """An onnxruntime CPU session with the options ptanet always wants.

    ``threads`` intra-op threads, one inter-op thread. ``optimization``: onnxruntime's graph
    optimisation level, "all" (its default; includes the blocked NCHWc layout, about 2.5x faster
    here than "basic") or "extended"/"basic", for measurements. ``session.force_spinning_stop`` makes idle
    worker threads sleep instead of spin: with several sessions of 2+ threads in one process
    (export verification next to a predictor, tests), spinning threads steal each other's cores
    and everything runs 6-10x slower.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: its warnings about unused constants are noise to users
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
    if not isinstance(source, ort.InferenceSession) and (Path(source).is_dir() or Path(source).name == ARTIFACT_MANIFEST):
        return read_metadata(read_artifact(source)[0][1])  # a switchable folder: every graph has the metadata
    session = source if isinstance(source, ort.InferenceSession) else ortsession(source)
    props = session.get_modelmeta().custom_metadata_map
    where = name or (source if not isinstance(source, ort.InferenceSession) else "<onnx session>")
    if props.get("format") != json.dumps(METADATA_FORMAT):
        raise ValueError(f"{where}: not a ptanet ONNX export (no {METADATA_FORMAT!r} metadata)")
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: corrupt ptanet metadata ({exc})") from None
    version = meta.get("format_version", 0)
    if version != METADATA_VERSION:
        raise ValueError(f"{where}: ptanet ONNX format version {version!r}, this ptanet reads "
                         f"version {METADATA_VERSION} only; export the checkpoint again with this ptanet")
    try:
        labels = {int(k): v for k, v in meta["labels"].items()}
    except (KeyError, AttributeError, TypeError, ValueError):
        labels = {}
    if sorted(labels) != [0, 1] or not all(isinstance(v, str) and v for v in labels.values()):
        raise ValueError(f"{where}: corrupt ptanet metadata (the label map must name classes 0 and 1, "
                         f"got {meta.get('labels')!r})")
    meta["labels"] = labels
    if not isinstance(meta.get("preprocess"), dict):
        raise ValueError(f"{where}: corrupt ptanet metadata (no preprocess settings)")
    if meta.get("config") is not None:
        try:
            meta["config"] = parse_config(meta["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: corrupt ptanet metadata (invalid configuration: {exc})") from None
    return meta


def _config_name(text: str) -> str:
    """"lhh", "PTA-LHH", "No PTA" -> the names the metadata uses (without importing torch)."""
    text = text.strip()
    if text.lower().replace(" ", "") in ("nopta", "baseline"):
        return "No PTA"
    return text.upper().removeprefix("PTA-")


class DeployedModel:
    """An exported ptanet model run with onnxruntime: a static file (one configuration) or a
    switchable artifact (several, chosen with :meth:`set_config`, no reload): a switchable folder
    (one graph per configuration sharing one weights file, ``ptanet export``'s default) or a
    switchable file (one graph, an ``If`` per configuration, the configuration an input).

    ``configs`` lists what the artifact holds, each with ``config``, ``model``, ``params``, ``macs``,
    ``mops`` and ``val`` (the validation metrics recorded with the checkpoint, or None). ``run``
    takes uint8 RGB face crops (N, S, S, 3) as ``Preprocess.crop`` gives them and returns the
    (N, 2) probabilities [live, spoof]; :attr:`threshold` is the spoof threshold the file stores for
    the active configuration (0.5 when it stores none). With ``warm`` (default) every configuration runs once at
    load, so the first inference after a switch costs what a steady one does.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, warm: bool = True, optimization: str = "all") -> None:
        self.path = Path(path)
        if self.path.is_dir() or self.path.name == ARTIFACT_MANIFEST:
            graphs = read_artifact(self.path)
            self._graphs = {config: ortsession(graph, threads, optimization) for config, graph in graphs}
            where = {config: str(graph) for config, graph in graphs}
        else:
            self._graphs = {None: ortsession(self.path, threads, optimization)}
            where = {None: str(self.path)}
        metas = {config: read_metadata(session, where[config]) for config, session in self._graphs.items()}
        self.meta = next(iter(metas.values()))
        for config, meta in metas.items():
            check_threshold(meta.get("threshold"), where[config])
            self.size = self._check_input(self._graphs[config], meta, where[config])
            if config is not None and (meta.get("config") or "No PTA") != config:
                raise ValueError(f"{where[config]}: holds configuration {meta.get('config') or 'No PTA'}, "
                                 f"the manifest says {config}")
        one = next(iter(self._graphs.values()))
        image = next(i for i in one.get_inputs() if i.name == INPUT_NAME)  # checked above
        self.fixed_batch = image.shape[0] if isinstance(image.shape[0], int) else None
        self.folder = None not in self._graphs
        self.switchable = self.folder or CONFIG_INPUT in {i.name for i in one.get_inputs()}
        self.configs: list[dict] = list(self.meta.get("configs") or [])
        self._index = {(c["config"] or "No PTA"): k for k, c in enumerate(self.configs)}
        if self.switchable and not self.configs:
            raise ValueError(f"{self.path}: a switchable file without the list of its configurations in the metadata")
        if self.folder and set(self._index) != set(self._graphs):
            raise ValueError(f"{self.path}: the manifest lists {', '.join(self._graphs)}, the graphs' metadata "
                             f"{', '.join(self._index)}")
        # (session, extra feeds) of the active configuration, replaced whole by set_config, so that a
        # run in another thread keeps the pair it started with.
        self._active: tuple[ort.InferenceSession, dict] = (one, {})
        self.config: str | None = self.meta.get("config")
        if self.switchable:
            self.set_config(self.configs[0]["config"] or "No PTA")
        if warm:
            blank = np.zeros((self.fixed_batch or 1, self.size, self.size, 3), np.uint8)
            for c in (self.configs if self.switchable else [None]):
                if c is not None:
                    self.set_config(c["config"] or "No PTA")
                self.run(blank)
            if self.switchable:
                self.set_config(self.configs[0]["config"] or "No PTA")

    @staticmethod
    def _check_input(session: ort.InferenceSession, meta: dict, where: str) -> int:
        inputs = {i.name: i for i in session.get_inputs()}
        size = int(meta["preprocess"]["size"])
        image = inputs.get(INPUT_NAME)
        if image is None or image.type != "tensor(uint8)" or list(image.shape[1:]) != [size, size, 3]:
            got = f"{image.name} {image.type} {image.shape}" if image is not None else f"no input {INPUT_NAME!r}"
            raise ValueError(f"{where}: input {got} does not match the metadata (expected {INPUT_NAME} "
                             f"uint8 [N, {size}, {size}, 3])")
        return size

    @property
    def session(self) -> ort.InferenceSession:
        """The onnxruntime session that runs the active configuration."""
        return self._active[0]

    @property
    def config_names(self) -> list[str]:
        return list(self._index)

    @property
    def threshold(self) -> float:
        """Spoof iff score >= this, for the active configuration (see ``ptanet.threshold``)."""
        stored = threshold_for(self.meta.get("threshold"), self.config, str(self.path))
        return DEFAULT_THRESHOLD if stored is None else stored

    def set_config(self, config: str) -> "DeployedModel":
        """Activate ``config`` (e.g. "LHH"); an unknown one raises a ValueError naming those held."""
        name = _config_name(config)
        if name != "No PTA":
            name = parse_config(name)  # a malformed name: the message names the allowed letters
        if name not in self._index:
            held = (f"configuration {self.config_names[0]} only" if len(self._index) == 1
                    else f"configurations {', '.join(self.config_names)}")
            raise ValueError(f"{self.path}: no configuration {config!r} in this file; it holds {held}")
        if self.folder:
            self._active = (self._graphs[name], {})
        elif self.switchable:
            self._active = (self._active[0], {CONFIG_INPUT: np.array(self._index[name], np.int64)})
        self.config = None if name == "No PTA" else name
        return self

    def _check(self, crops: np.ndarray) -> np.ndarray:
        expected = f"uint8 (N, {self.size}, {self.size}, 3) RGB face crops"
        if not isinstance(crops, np.ndarray):
            raise ValueError(f"{self.path}: expected a numpy array of {expected}, got {type(crops).__name__}")
        if crops.dtype != np.uint8:
            raise ValueError(f"{self.path}: expected {expected}, got dtype {crops.dtype} (the graph normalises "
                             "uint8 pixels itself: do not scale or normalise them)")
        if crops.ndim != 4 or crops.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"{self.path}: expected {expected}, got shape {crops.shape}")
        return np.ascontiguousarray(crops)

    def run(self, crops: np.ndarray) -> np.ndarray:
        """(N, 2) probabilities [live, spoof] of the active configuration."""
        crops = self._check(crops)
        session, feeds = self._active
        step = self.fixed_batch or max(len(crops), 1)
        outs = [session.run([OUTPUT_NAMES[0]], {INPUT_NAME: crops[i:i + step], **feeds})[0]
                for i in range(0, len(crops), step)]
        return np.concatenate(outs) if outs else np.zeros((0, 2), np.float32)

    def spoof_scores(self, crops: np.ndarray) -> np.ndarray:
        """(N,) probability of spoof."""
        return self.run(crops)[:, 1]


# --- choosing a configuration: pure functions of measured rows --------------------------------------
def pareto_front(rows: list[dict], cost: str = "latency_ms", quality: str = "acer") -> list[dict]:
    """The rows no other row beats on both ``cost`` and ``quality`` (both lower = better), cheapest
    first. Rows without a quality are left out."""
    rated = sorted((r for r in rows if r.get(quality) is not None and r.get(cost) is not None),
                   key=lambda r: (r[cost], r[quality]))
    front, best = [], float("inf")
    for row in rated:
        if row[quality] < best:
            front.append(row)
            best = row[quality]
    return front


def select_config(rows: list[dict], budget_ms: float | None = None, budget_rel: float | None = None,
                  cost: str = "latency_ms", quality: str = "acer", reference: str = "HHH") -> dict:
    """The row with the best (lowest) recorded ``quality`` whose ``cost`` fits the budget; ties go to
    the cheaper. ``budget_rel`` is a fraction of the ``reference`` configuration's cost. Rows without
    a quality rank after every rated one (then by cost). Raises ValueError when nothing fits."""
    if (budget_ms is None) == (budget_rel is None):
        raise ValueError("give exactly one of budget_ms and budget_rel")
    if budget_rel is not None:
        ref = next((r for r in rows if r.get("config") == reference), None)
        if ref is None:
            raise ValueError(f"budget_rel needs the reference configuration {reference} among the measured ones")
        budget_ms = budget_rel * ref[cost]
    fits = [r for r in rows if r.get(cost) is not None and r[cost] <= budget_ms]
    if not fits:
        fastest = min(rows, key=lambda r: r[cost])
        raise ValueError(f"no configuration fits {budget_ms:.3g} ({cost}); the fastest, "
                         f"{fastest.get('config') or fastest.get('model')}, needs {fastest[cost]:.3g}")
    return min(fits, key=lambda r: (r.get(quality) is None, r.get(quality) or 0.0, r[cost]))


class AdaptiveController:
    """Keeps a latency budget under changing load by stepping along a ladder of configurations.

    ``ladder``: configurations from the cheapest to the dearest (e.g. a Pareto front), ``costs`` their
    relative costs (multiply-adds or latencies; same order). After every ``window`` frames it looks at
    the window's ``percentile`` latency p: above ``budget_ms`` it steps one rung cheaper; if the next
    dearer rung would still fit with margin (``p * cost_next / cost_now <= headroom * budget_ms``) it
    steps one rung dearer. The gap between 1 and ``headroom`` is the hysteresis that stops it from
    flapping, and the window restarts after each step so each decision sees only the new rung's
    frames. Pure: feed it latencies (:meth:`observe`), it answers the configuration to run next.
    """

    def __init__(self, ladder: list[str], costs: list[float], budget_ms: float, window: int = 15,
                 percentile: float = 90.0, headroom: float = 0.8, start: str | None = None) -> None:
        if len(ladder) != len(costs) or not ladder:
            raise ValueError("ladder and costs need the same, non-zero length")
        if not 0 < headroom < 1:
            raise ValueError(f"headroom must be in (0, 1), got {headroom}")
        if budget_ms <= 0 or window < 1:
            raise ValueError("budget_ms must be positive and window at least 1")
        self.ladder, self.costs = list(ladder), [float(c) for c in costs]
        self.budget_ms, self.window, self.percentile, self.headroom = float(budget_ms), int(window), percentile, headroom
        self.index = self.ladder.index(start) if start is not None else len(self.ladder) - 1
        self._seen: list[float] = []

    @property
    def config(self) -> str:
        return self.ladder[self.index]

    def observe(self, latency_ms: float) -> str:
        """Record one frame's latency (of the current configuration); returns the next configuration."""
        self._seen.append(float(latency_ms))
        if len(self._seen) < self.window:
            return self.config
        p = float(np.percentile(self._seen, self.percentile))
        self._seen = []
        if p > self.budget_ms and self.index > 0:
            self.index -= 1
        elif (self.index + 1 < len(self.ladder)
              and p * self.costs[self.index + 1] / self.costs[self.index] <= self.headroom * self.budget_ms):
            self.index += 1
        return self.config
