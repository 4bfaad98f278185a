"""Training settings, declared once.

Every option of a run is one field of :class:`TrainSettings`, with its default (the paper's, Section 4),
its help text and its group. The command line's flags are generated from these fields
(:func:`add_setting_arguments`), YAML files and flags are merged into them by :func:`resolve_settings`
alone, and the resolved settings are saved with the run (``settings.json``, and in every checkpoint).
Adding an option is one field here plus its use.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ptanet.configs import PAPER_SAMPLING, parse_config, parse_configs, parse_sampling
from ptanet.models import check_arch, is_pta_arch, list_models
from ptanet.preprocess import Preprocess

LR_SCHEDULES = ("constant", "cosine")
GROUPS = ("data", "model", "optimisation", "output")


def option(default: Any = None, help: str = "", group: str = "optimisation", *, flag: str | None = None,
           choices: tuple | None = None, type: Any = None, metavar: str | None = None, cli: bool = True,
           safe_on_resume: bool = False, default_factory: Any = None) -> Any:
    """A settings field with what the command line needs to offer it.

    ``type`` is the value type for the flag when ``default`` is None (otherwise the default's type);
    ``safe_on_resume`` marks settings that may differ when a run is resumed (they change how the run
    is executed or how long it goes on, not what it computes per epoch).
    """
    meta = {"help": help, "group": group, "flag": flag, "choices": choices, "type": type, "metavar": metavar,
            "cli": cli, "safe_on_resume": safe_on_resume}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainSettings:
    """Everything a training run depends on. Defaults are the paper's (Section 4)."""

    # --- data -----------------------------------------------------------------------------------
    data: str = option("", "data root: CelebA-Spoof layout, or live/ and spoof/ folders with --source folder",
                       "data", cli=False)
    source: str = option("celeba", "data layout", "data", choices=("celeba", "folder"))
    protocol: str = option("intra_test", "CelebA-Spoof protocol folder under metas/", "data")
    detect: str | None = option(None, "face detector for folder images without boxes: haar, or yunet:PATH.onnx",
                                "data", type=str)
    cache: str | None = option(None, "crop-cache folder (default: <out>/../cache/<data folder name>)", "data",
                               type=str, safe_on_resume=True)
    size: int = option(128, "face crop size in pixels", "data")
    # Enlarged about the box's centre (Preprocess.box_scale); stored in the checkpoint, so inference
    # and export crop as training did.
    box_scale: float = option(1.0, "crop the face box enlarged this many times about its centre (1.0: the "
                                   "paper's tight box)", "data")
    val_fraction: float = option(0.2, "part of train held out for validation", "data")
    val_split: str = option("subject", "validation part: whole subjects, or random images (the paper's; it "
                                       "leaks identities into validation)", "data", choices=("subject", "random"))
    seed: int = option(0, "seed of the split, initialisation, sampling, shuffling and augmentation", "data")
    # Cross-validation (ptanet.cv) trains each fold with its people held out of train and validation.
    holdout_subjects: list[str] = option(help="subjects of the train list kept out of training and validation, "
                                              "comma-separated (a cross-validation fold)", group="data", type=str,
                                         default_factory=list)
    prepare_workers: int = option(2, "processes that crop faces into the cache", "data", safe_on_resume=True)
    # Attack-type transfer: a print-only real set never shows a screen; the generator's replays do.
    mix_synth: float = option(0.0, "share of the train part made of synthetic live faces and screen replays from "
                                   "synth_data (0: off; not in the paper)", "data", metavar="FRACTION")
    synth_data: str | None = option(None, "synthetic set written by ptanet synth, for mix_synth", "data")

    # --- model ----------------------------------------------------------------------------------
    arch: str = option("pta_mobilenet_v2", "architecture (mobilenet_v2 is the No PTA baseline)", "model",
                       choices=tuple(list_models()))
    width_mult: float = option(1.0, "MobileNetV2 width multiplier", "model")

    # --- optimisation ---------------------------------------------------------------------------
    epochs: int = option(20, "epochs (more may be given when resuming)", safe_on_resume=True)
    # Global: torchrun's N processes take batch_size / N each, so the recipe (and lr) stays the paper's.
    batch_size: int = option(32, "images per step, over all processes under torchrun (each takes batch_size / N)")
    lr: float = option(1e-4, "Adam learning rate")
    augment: bool = option(True, "colour jitter + ISO noise (the paper's augmentations)", flag="--no-augment")
    hflip: bool = option(False, "add a random horizontal flip to the augmentations (not in the paper)")
    affine: bool = option(False, "add a small random scale/shift/rotation to the augmentations (not in the paper)")
    # Meant for wide crops: views without a photo's edge or the background force cues in the face itself.
    zoom: float = option(1.0, "half the time, train on a random square window of 1/Z to all of the crop's side, "
                              "resized back (1: off; not in the paper)", metavar="Z")
    # Small steps in the last epochs let the weights settle instead of wandering.
    lr_schedule: str = option("constant", "learning-rate schedule over the epochs", choices=LR_SCHEDULES)
    # The decay after n updates is min(d, (1 + n) / (10 + n)) (TensorFlow's rule, see loop._warmed_up_ema).
    ema_decay: float | None = option(None, "validate, select and keep an exponential moving average of the "
                                           "weights with this decay, e.g. 0.995 (not in the paper)",
                                     flag="--ema", type=float, metavar="DECAY")
    class_weights: str | None = option(None, "weight the loss so that live and spoof count alike (default: plain "
                                             "cross-entropy, the paper's)", choices=("balanced",))
    # With few people and unequal counts, who is in a picture predicts its label; balanced groups
    # take that shortcut away.
    balance: str | None = option(None, "draw every (subject, class) group equally often (default: a plain "
                                       "shuffle, the paper's)", choices=("subject",))
    sampling: dict[str, float] = option(help="configurations drawn in training and their weights, e.g. "
                                             "HHH=0.45,LHH=0.15,HLH=0.15,HHL=0.15,LLL=0.1 (paper Table 2)",
                                        type=str, default_factory=lambda: dict(PAPER_SAMPLING))
    # Once-for-all / US-Nets practice: the light sub-networks learn from the heavy one's soft output.
    distill: str | None = option(None, "in-place distillation: every step also trains this heavy configuration "
                                       "(e.g. HHH or BBB) on the labels, and the sampled configuration on the labels "
                                       "plus the heavy one's detached soft predictions (not in the paper)",
                                 type=str, metavar="TEACHER")
    val_configs: list[str] = option(help="configurations validated each epoch: paper, all, or a list",
                                    type=str, default_factory=lambda: parse_configs("paper"))
    select_config: str = option("HHH", "the configuration whose validation ACER picks the best epoch (Figure 2)")
    bn_configs: list[str] = option(help="configurations that get their own BatchNorm statistics after training: "
                                        "paper, all, a list, or none", type=str,
                                   default_factory=lambda: parse_configs("paper"))
    bn_images: int = option(1000, "training crops used to re-estimate BatchNorm statistics per configuration")
    # The weights were trained on the statistics of augmented batches; plain crops are the
    # once-for-all practice, so that stays the default.
    bn_augment: bool = option(False, "re-estimate BatchNorm statistics on augmented crops (colour, noise, flip "
                                     "and the training's zoom) instead of plain ones")
    eval_batch_size: int = option(128, "batch size of validation and BatchNorm recalibration", safe_on_resume=True)

    # --- output and execution -------------------------------------------------------------------
    # Safe on resume: a run folder moved or renamed is the same run.
    out: str = option("runs/train", "run folder: settings.json, history.jsonl, last.pt, best.pt", "output",
                      safe_on_resume=True)
    workers: int | None = option(None, "DataLoader workers per process (default: 0 on the CPU, where the cache is "
                                       "read >10x faster than training; on CUDA the cores per process less one, "
                                       "at most 8)", "output", type=int, safe_on_resume=True)
    # --- execution: how and where a run computes (devices, mixed precision, torchrun) ----------------
    device: str = option("auto", "where to train: auto (CUDA when present), cpu or cuda", "output",
                         choices=("auto", "cpu", "cuda"), safe_on_resume=True)
    precision: str = option("auto", "on CUDA: auto = bf16 autocast where the GPU supports it, else fp16 with a "
                                    "gradient scaler; fp32 turns mixed precision off. The CPU trains in fp32",
                            "output", choices=("auto", "fp32", "bf16", "fp16"), safe_on_resume=True)
    compile: bool = option(False, "torch.compile the model (CUDA; the first steps of each configuration compile)",
                           "output", safe_on_resume=True)
    prefetch: int = option(4, "batches each DataLoader worker loads ahead (CUDA)", "output", safe_on_resume=True)
    # Measured in README "Training at scale": both give the same weights.
    ddp_unused: str = option("zero", "under torchrun, how branches a configuration leaves out are synchronised: "
                                     "zero (a zero-valued loss term over them, then no step for them) or find "
                                     "(DistributedDataParallel's find_unused_parameters)", "output",
                             choices=("zero", "find"), safe_on_resume=True)
    max_batches: int | None = option(None, "cap on batches per epoch (quick runs and tests)", "output", type=int)

    def __post_init__(self) -> None:
        # Stored paths are absolute, so a checkpoint evaluated from another folder finds its data.
        if self.data:
            self.data = str(Path(self.data).resolve())
        if self.cache:
            self.cache = str(Path(self.cache).resolve())
        if self.synth_data:
            self.synth_data = str(Path(self.synth_data).resolve())
        if not 0.0 <= self.mix_synth < 1.0:
            raise ValueError(f"mix_synth must be in [0, 1), got {self.mix_synth!r}")
        if self.mix_synth > 0 and not self.synth_data:
            raise ValueError("mix_synth needs synth_data: a set written by ptanet synth")
        self.out = str(Path(self.out).resolve())
        check_arch(self.arch)
        self.sampling = parse_sampling(self.sampling)
        self.val_configs = parse_configs(self.val_configs)
        self.bn_configs = parse_configs(self.bn_configs)
        self.select_config = parse_config(self.select_config)
        if self.distill is not None:
            if not self.is_pta:
                raise ValueError(f"distill needs a PTA architecture; {self.arch} has no configurations")
            self.distill = parse_config(self.distill)
        if isinstance(self.holdout_subjects, str):
            self.holdout_subjects = [s.strip() for s in self.holdout_subjects.split(",") if s.strip()]
        self.holdout_subjects = sorted(str(s) for s in self.holdout_subjects)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and not (value in choices or (value is None and f.default is None)):
                allowed = (" or ".join(["None", *map(repr, choices)]) if f.default is None
                           else f"one of {list(choices)}")
                raise ValueError(f"{f.name} must be {allowed}, got {value!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        if not self.zoom >= 1.0:
            raise ValueError(f"zoom must be >= 1 (1 is off), got {self.zoom!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        for name in ("epochs", "batch_size", "size", "prefetch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.preprocess  # raises on a bad box_scale now, not when the data is first read

    @property
    def is_pta(self) -> bool:
        return is_pta_arch(self.arch)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.size, box_scale=self.box_scale)

    @property
    def cache_dir(self) -> Path:
        if self.cache:
            return Path(self.cache)
        return Path(self.out).parent / "cache" / Path(self.data).resolve().name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(TrainSettings))
SAFE_ON_RESUME = frozenset(f.name for f in dataclasses.fields(TrainSettings) if f.metadata["safe_on_resume"])


def resolve_settings(config_file: str | Path | None = None, base: dict[str, Any] | None = None,
                     **overrides: Any) -> TrainSettings:
    """Settings from the defaults (or ``base``: a resumed run's own), then an optional YAML file, then
    explicit overrides (the command line); ``None`` overrides mean "not given". The one place where
    settings are merged."""
    values: dict[str, Any] = dict(base or {})
    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read settings ({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: settings must be a mapping of name: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - SETTING_NAMES)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(SETTING_NAMES)}")
    return TrainSettings(**values)


def add_setting_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...] = GROUPS) -> None:
    """Add one flag per setting of ``groups`` to ``parser``, named after the field (``--box-scale``).

    Every flag defaults to None ("not given"), so that :func:`resolve_settings` lets a YAML file or the
    field's default stand; a boolean setting is a switch towards the non-default value.
    """
    for group in groups:
        title = {"data": "data", "model": "model", "optimisation": "optimisation",
                 "output": "output and execution"}[group]
        arguments = parser.add_argument_group(f"{title} settings")
        for f in dataclasses.fields(TrainSettings):
            meta = f.metadata
            if meta["group"] != group or not meta["cli"]:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            resume_note = " [may change on --resume]" if meta["safe_on_resume"] else ""
            help_text = meta["help"] + (f" (default: {_shown(default)})" if default not in (None, "") else "")
            if isinstance(default, bool):
                arguments.add_argument(flag, dest=f.name, action="store_const", const=not default, default=None,
                                       help=help_text + resume_note)
                continue
            value_type = meta["type"] or (str if default is None else type(default))
            arguments.add_argument(flag, dest=f.name, type=value_type, choices=meta["choices"], default=None,
                                   metavar=meta["metavar"], help=help_text + resume_note)


def _shown(default: Any) -> str:
    if isinstance(default, dict):
        return ",".join(f"{k}={v:g}" for k, v in default.items())
    if isinstance(default, list):
        return ",".join(default) or "none"
    return str(default)


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (those :func:`add_setting_arguments` added)."""
    return {name: value for name, value in vars(args).items() if name in SETTING_NAMES}


def load_data(settings: TrainSettings, progress: bool = True) -> dict[str, Any]:
    """The run's crop caches (train/val[/test]), prepared once and reused (see ``build_datasets``)."""
    from ptanet.data import build_datasets  # the torch data stack, only when data is read

    return build_datasets(
        settings.data, settings.cache_dir, settings.preprocess, protocol=settings.protocol,
        val_fraction=settings.val_fraction, val_split=settings.val_split, seed=settings.seed,
        workers=settings.prepare_workers, source=settings.source, detect=settings.detect, progress=progress,
        holdout_subjects=settings.holdout_subjects, mix_root=settings.synth_data, mix_fraction=settings.mix_synth,
    )
