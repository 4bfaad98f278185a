"""The `ptanet` command: one subcommand per job. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys

from ptanet.train.settings import add_setting_arguments, setting_overrides


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptanet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each _add_* registers one subcommand and sets `func` to its handler.
    for add in (_add_synth, _add_prepare, _add_bench_data, _add_bench_train, _add_train, _add_recalibrate, _add_evaluate, _add_report, _add_complexity,
                _add_export, _add_predict, _add_demo, _add_nuaa):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as exc:
        # Library errors already name the file and the problem; print them without a traceback.
        print(f"ptanet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that exists as the wrong kind, no permission, a full disk, ...
        where = exc.filename if exc.filename is not None else ""
        message = f"{where}: {exc.strerror}" if where and exc.strerror else str(exc)
        print(f"ptanet {args.command}: error: {message}", file=sys.stderr)
        return 2


def _print_table(rows: list[dict], columns: list, fmt: str, out: str | None = None) -> None:
    """Print rows as markdown (people) or JSON/CSV (machines); optionally also write all three."""
    from ptanet.tables import render, write_table

    print(render(rows, columns, fmt), end="")
    if out:
        paths = write_table(rows, columns, out)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("markdown", "json", "csv"), default="markdown", help="output format (default: markdown)")


# --- complexity -------------------------------------------------------------------------------
def _add_complexity(sub) -> None:
    p = sub.add_parser(
        "complexity",
        help="parameters and multiply-adds per configuration (paper Table 4)",
        description="Parameters in use and multiply-adds (ptflops) for No PTA and PTA configurations; "
        "--latency adds CPU latency measured here (median, ratio to No PTA).",
    )
    p.add_argument("--all", action="store_true", help="all 27 configurations instead of the paper's six")
    p.add_argument("--configs", help="comma-separated configurations, e.g. HHH,LLL (default: the paper's)")
    p.add_argument("--size", type=int, default=128, help="input size in pixels (default: 128, the paper's)")
    p.add_argument("--latency", action="store_true", help="also measure CPU latency (batch 1, 1 thread)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model and round for --latency")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all models for --latency (median taken)")
    p.add_argument("--out", help="also write OUT.md, OUT.json and OUT.csv")
    _add_format(p)
    p.set_defaults(func=_cmd_complexity)


def _cmd_complexity(args) -> int:
    from ptanet.bench import COMPLEXITY_COLUMNS, LATENCY_COLUMNS, complexity_table, latency_table
    from ptanet.configs import parse_configs

    configs = parse_configs("all" if args.all else args.configs)
    rows = complexity_table(configs, size=args.size)
    columns = list(COMPLEXITY_COLUMNS)
    if args.latency:
        latency = {r["model"]: r for r in latency_table(configs, size=args.size, runs=args.runs, rounds=args.rounds)}
        for row in rows:
            row.update({k: latency[row["model"]][k] for k in ("latency_ms", "relative_latency")})
        columns += LATENCY_COLUMNS
    _print_table(rows, columns, args.format, args.out)
    return 0


# --- data -------------------------------------------------------------------------------------
def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write the embedded synthetic live/spoof set (CelebA-Spoof layout)")
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subjects", type=int, default=24)
    p.add_argument("--test-subjects", type=int, default=8)
    p.add_argument("--per-subject", type=int, default=80, help="images per subject (half live, half spoof)")
    p.add_argument("--size", type=int, default=176, help="frame size in pixels")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from ptanet.data.synth import write_synth

    summary = write_synth(args.out, n_subjects_train=args.train_subjects, n_subjects_test=args.test_subjects,
                          images_per_subject=args.per_subject, seed=args.seed, size=args.size, workers=args.workers,
                          progress=True)
    print(summary)
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="crop every face once into the training cache (resumable)")
    p.add_argument("data", help="data root (CelebA-Spoof layout, or live/ and spoof/ folders with --source folder)")
    p.add_argument("--out", default="runs/prepare", help="only used to place the default cache (<out>/../cache)")
    add_setting_arguments(p, ("data",))
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    from ptanet.data.dataset import describe_data
    from ptanet.train.settings import load_data, resolve_settings

    settings = resolve_settings(**{**setting_overrides(args), "data": args.data, "out": args.out})
    for line in describe_data(load_data(settings)):
        print(line)
    return 0


def _add_bench_data(sub) -> None:
    p = sub.add_parser("bench-data", help="images/s of reading the crop cache with augmentation, per worker count")
    p.add_argument("cache", help="a cache folder written by prepare (e.g. runs/cache/nuaa-dev/train)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--batches", type=int, default=50)
    _add_format(p)
    p.set_defaults(func=_cmd_bench_data)


def _cmd_bench_data(args) -> int:
    from ptanet.data import CropCache, bench_loader

    cache = CropCache(args.cache)
    rows = bench_loader(cache, cache.preprocess, args.batch_size, [int(w) for w in args.workers.split(",")], args.batches)
    _print_table(rows, [("workers", "DataLoader workers", "int"), ("images", "Images", "int"),
                        ("seconds", "Seconds", "f2"), ("images_per_s", "Images/s", "f2")], args.format)
    return 0


def _add_bench_train(sub) -> None:
    p = sub.add_parser("bench-train", help="training images/s of PTA and No PTA: loader alone, model alone, both",
                       description="Training speed on this device and process count (also under torchrun), "
                       "PTA with Table 2 sampling against No PTA on the same data and batch; the PTA / No PTA "
                       "time ratio is paper Table 5's (0.875 on a GTX 1050 Ti).")
    p.add_argument("cache", help="a cache folder written by prepare (e.g. runs/cache/nuaa-dev/train)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (default: 256)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window (default: 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported (default: 3)")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: as ptanet train)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--ddp-unused", choices=("zero", "find"), default="zero", help="under torchrun, see ptanet train")
    p.add_argument("--epoch-images", type=int,
                   help="images per epoch for the minutes column (default: the cache's; CelebA-Spoof: about 494000)")
    p.add_argument("--parts", default="loader,model,both", help="what to measure (default: loader,model,both)")
    p.add_argument("--models", default="pta,no-pta", help="which models (default: pta,no-pta)")
    p.add_argument("--out", help="also write OUT.md, OUT.json and OUT.csv")
    _add_format(p)
    p.set_defaults(func=_cmd_bench_train)


def _cmd_bench_train(args) -> int:
    from ptanet.bench_train import BENCH_TRAIN_COLUMNS, bench_train
    from ptanet.data import CropCache

    main_rank = int(os.environ.get("RANK", "0")) == 0
    rows = bench_train(CropCache(args.cache), batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                       repeats=args.repeats, workers=args.workers, device=args.device, precision=args.precision,
                       compile=args.compile, ddp_unused=args.ddp_unused, epoch_images=args.epoch_images,
                       parts=tuple(args.parts.split(",")), models=tuple(args.models.split(",")),
                       progress=(lambda m: print(m, file=sys.stderr)) if main_rank else (lambda m: None))
    if main_rank:
        r = rows[0]
        print(f"{r['ddp_unused']} unused branches, " if r["processes"] > 1 else "", end="", file=sys.stderr)
        print(f"{r['device']}, {r['processes']} process(es), batch {r['batch_size']}, {r['workers']} workers, "
              f"{r['precision']}{', compiled' if r['compile'] else ''}; epoch of {r['epoch_images']} images",
              file=sys.stderr)
        _print_table(rows, BENCH_TRAIN_COLUMNS, args.format, args.out)
    return 0


# --- training and evaluation --------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train PTA-MobileNetV2 (or the No PTA baseline) with the paper's recipe",
                       description="Settings: defaults (the paper's), then --config YAML, then these flags "
                       "(names as in settings.json). --resume continues a run with its own settings; only those "
                       "marked [may change on --resume] may differ.")
    p.add_argument("--data", help="data root: CelebA-Spoof layout, or live/ and spoof/ folders with --source folder")
    p.add_argument("--config", dest="config_file", help="YAML file of settings (names as in settings.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    add_setting_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from ptanet.train import loop
    from ptanet.train.settings import resolve_settings

    settings = resolve_settings(args.config_file, **{**setting_overrides(args), "data": args.data})
    result = loop.train(settings, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the run
        print(f"best epoch {result.best_epoch}: {result.best_checkpoint}")
    return 0


def _add_recalibrate(sub) -> None:
    p = sub.add_parser("recalibrate", help="re-estimate a trained PTA checkpoint's per-configuration BatchNorm statistics",
                       description="What training does at its end, again, with other settings (default: the checkpoint's own).")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="write here instead of over the checkpoint")
    p.add_argument("--configs", help="paper, all, or a list like HHH,LLL (default: the checkpoint's bn_configs)")
    p.add_argument("--bn-images", type=int, help="training crops to use")
    p.add_argument("--bn-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="augmented crops (colour jitter, ISO noise, flip) or plain ones")
    p.set_defaults(func=_cmd_recalibrate)


def _cmd_recalibrate(args) -> int:
    from ptanet.configs import parse_configs
    from ptanet.train.batchnorm import recalibrate_checkpoint

    configs = parse_configs(args.configs) if args.configs else None
    print(recalibrate_checkpoint(args.checkpoint, args.out, configs, args.bn_images, args.bn_augment))
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="paper Table 3 for checkpoints on their test split")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (e.g. RUN/best.pt); several make one table")
    p.add_argument("--configs", help="PTA configurations: paper (default), all, or a list like HHH,LLL")
    p.add_argument("--data", help="evaluate on this data root instead of the one the checkpoint was trained on "
                   "(only its test split is read: a test-only set works)")
    p.add_argument("--source", choices=("celeba", "folder"), help="layout of --data (default: the checkpoint's)")
    p.add_argument("--cache", help="crop cache for --data (default: eval-cache/ beside the checkpoint)")
    p.add_argument("--no-bn-recalibration", action="store_true",
                   help="only the shared BatchNorm statistics (reproduces the paper exactly)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="measure the test split (default) or the validation part, to compare ideas without test")
    p.add_argument("--out", help="folder for table3.md/json/csv (default: next to the first checkpoint, eval/ or eval-val/)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from ptanet.configs import parse_configs
    from ptanet.evaluate import evaluate_checkpoints, table3_markdown, write_table3

    rows = evaluate_checkpoints(args.checkpoints, parse_configs(args.configs), data=args.data,
                                bn_recalibration=not args.no_bn_recalibration, split=args.split,
                                source=args.source, cache=args.cache)
    out = Path(args.out) if args.out else Path(args.checkpoints[0]).parent / ("eval" if args.split == "test" else "eval-val")
    paths = write_table3(rows, out)
    print(table3_markdown(rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="Table 5 and Figure 2 (and the speed/quality plot) from run folders")
    p.add_argument("runs", nargs="+", help="run folders written by train")
    p.add_argument("--out", default="runs/report")
    p.add_argument("--config", default="HHH", help="PTA configuration shown against No PTA (default: HHH)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from ptanet.report import write_report

    for name, path in write_report(args.runs, args.out, args.config).items():
        print(f"{name}: {path}")
    return 0


# --- deployment ------------------------------------------------------------------------------------
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="ONNX files, one per configuration, verified against PyTorch")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="folder for model_<CONFIG>.onnx and manifest.json")
    p.add_argument("--configs", help="paper (default), all, or a list like HHH,LLL (ignored for No PTA)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    import json

    from ptanet.export import export_all

    manifest = export_all(args.checkpoint, args.out, configs=args.configs, opset=args.opset, dynamic_batch=not args.static_batch)
    print(json.dumps(manifest, indent=2))
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="live/spoof scores for images (a checkpoint or an exported .onnx)")
    p.add_argument("model", help="checkpoint (.pt) or ONNX file")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--config", help="PTA configuration to run (default: the model's)")
    p.add_argument("--detect", help="find the face: haar (bundled with OpenCV) or yunet:PATH.onnx")
    p.add_argument("--no-box-files", action="store_true", help="ignore <image>_BB.txt boxes beside the images")
    p.add_argument("--threshold", type=float, default=0.5, help="spoof if score >= threshold (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=32)
    _add_format(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from ptanet.infer import Predictor

    predictor = Predictor(args.model, config=args.config, detect=args.detect, threshold=args.threshold,
                          box_files=not args.no_box_files)
    rows = predictor.predict_paths(args.images, batch_size=args.batch_size)
    _print_table(rows, [("path", "Image", "str"), ("label", "Label", "str"), ("score", "Spoof score", "f3"),
                        ("config", "Config", "str"), ("box_source", "Box", "str"), ("error", "Error", "str")], args.format)
    return 1 if any(r.get("error") for r in rows) else 0


# --- whole experiments ----------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on embedded synthetic data: train PTA and No PTA, Tables 3-5, Figure 2")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, help="override the demo's epochs")
    p.set_defaults(func=_cmd_demo)


def _print_written(written: dict) -> None:
    print("\nwritten:")
    for name, path in written.items():
        print(f"  {name:20s} {path}")


def _cmd_demo(args) -> int:
    from ptanet.pipeline import run_demo

    overrides = {"epochs": args.epochs} if args.epochs else {}
    written = run_demo(args.out, **overrides)
    print((written["table3.md"]).read_text())
    _print_written(written)
    return 0


def _add_nuaa(sub) -> None:
    p = sub.add_parser("nuaa", help="the paper's full recipe on the real nuaa-dev set (../shared/data/nuaa-dev)")
    p.add_argument("--data", default=None, help="default: ../shared/data/nuaa-dev next to the project")
    p.add_argument("--out", default="runs/nuaa")
    p.add_argument("--epochs", type=int, help="default: 20 (the paper's)")
    p.add_argument("--lr", type=float, help="default: 1e-4 (the paper's)")
    p.add_argument("--config", dest="config_file",
                   help="YAML file of training settings for both models, e.g. recipes/nuaa_all_subjects.yaml (default: the paper's)")
    p.set_defaults(func=_cmd_nuaa)


def _cmd_nuaa(args) -> int:
    from pathlib import Path

    from ptanet.pipeline import run_experiment

    data = Path(args.data) if args.data else Path.cwd().parent / "shared" / "data" / "nuaa-dev"
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: nuaa-dev not found; pass --data")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    written = run_experiment(data, args.out, overrides, config_file=args.config_file)
    print((written["table3.md"]).read_text())
    _print_written(written)
    return 0
