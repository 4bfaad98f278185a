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
    for add in (_add_synth, _add_prepare, _add_bench_data, _add_bench_train, _add_train, _add_cv, _add_recalibrate, _add_evaluate, _add_report,
                _add_complexity, _add_export, _add_predict, _add_bench, _add_select, _add_calibrate, _add_fit_detector,
                _add_serve, _add_demo, _add_nuaa):
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
    p.add_argument("--latency", action="store_true",
                   help="also measure CPU latency with ptanet bench's timer (PyTorch eager, batch 1, 1 thread)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch", help="runtime timed by --latency")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model and round for --latency")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all models for --latency")
    p.add_argument("--out", help="also write OUT.md, OUT.json and OUT.csv")
    _add_format(p)
    p.set_defaults(func=_cmd_complexity)


def _cmd_complexity(args) -> int:
    from ptanet.bench import COMPLEXITY_COLUMNS, LATENCY_COLUMNS, benchmark, complexity_table
    from ptanet.configs import parse_configs

    configs = parse_configs("all" if args.all else args.configs)
    rows = complexity_table(configs, size=args.size)
    columns = list(COMPLEXITY_COLUMNS)
    if args.latency:  # one way to time a model: ptanet bench's
        measured = benchmark(None, configs, runtimes=[args.runtime], runs=args.runs * args.rounds, rounds=args.rounds,
                             size=args.size, bbb_variant=False, batch_runs=1)
        latency = {r["model"]: r for r in measured["rows"]}
        for row in rows:
            row.update(latency_ms=latency[row["model"]]["median_ms"], relative_latency=latency[row["model"]]["relative"])
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
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    _add_run_settings(p, "data root: CelebA-Spoof layout, or live/ and spoof/ folders with --source folder")
    _add_threshold_target(p)
    p.add_argument("--threshold-from", metavar="CV_DIR", help="store in RUN/best.pt one threshold per "
                   "configuration, chosen by --target on the pooled out-of-fold scores of ptanet cv --out CV_DIR")
    p.set_defaults(func=_cmd_train)


def _add_threshold_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="eer", help="rule for the threshold on out-of-fold scores: eer (default), "
                   "apcer=RATE or bpcer=RATE, as in ptanet calibrate")


def _add_run_settings(p: argparse.ArgumentParser, data_help: str) -> None:
    """--data, --config YAML and one flag per training setting (generated from TrainSettings)."""
    p.add_argument("--data", help=data_help)
    p.add_argument("--config", dest="config_file", help="YAML file of settings (names as in settings.json)")
    add_setting_arguments(p)


def _run_settings(args, **defaults):
    """Defaults, then --config YAML, then flags: the one merge (ptanet.train.settings.resolve_settings)."""
    from ptanet.train.settings import resolve_settings

    given = {k: v for k, v in setting_overrides(args).items() if v is not None}
    return resolve_settings(args.config_file, **{**defaults, **given, "data": args.data})


def _cmd_train(args) -> int:
    from ptanet.train import loop

    settings = loop.run_settings(args.config_file, args.resume, **{**setting_overrides(args), "data": args.data})
    if args.threshold_from:
        from ptanet.cv import cv_threshold

        cv_threshold(args.threshold_from, args.target)  # a missing or broken folder fails before training
    result = loop.train(settings, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the run
        print(f"best epoch {result.best_epoch}: {result.best_checkpoint}")
        if args.threshold_from:
            from ptanet.cv import store_cv_threshold

            store_cv_threshold(result.best_checkpoint, args.threshold_from, args.target)
    return 0


def _add_cv(sub) -> None:
    p = sub.add_parser("cv", help="k-fold cross-validation by subject with train's settings (mean, sd, pooled out-of-fold)",
                       description="Every training subject is held out in exactly one fold; each fold trains with "
                       "these settings on the others and scores the held-out people. Writes OUT/cv.md/json/csv, "
                       "OUT/oof_scores.json and one run folder per fold and seed (resumable).")
    p.add_argument("--folds", type=int, default=4, help="number of subject folds (default: 4)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each gives its own folds and models (default: 0)")
    p.add_argument("--configs", help="configurations to report: paper (default), all, or a list")
    p.add_argument("--only", help="train only these folds (comma-separated, 0-based), e.g. to run folds in parallel "
                   "processes; the call that finds every fold done writes the summary")
    p.add_argument("--transfer-data", help="another CelebA-layout root (e.g. ptanet synth's) whose test split every "
                   "fold model also scores, per attack group: OUT/transfer.md/json/csv")
    _add_threshold_target(p)
    p.add_argument("--final", action="store_true", help="then train the final model on every subject (OUT/final) "
                   "and store the pooled out-of-fold threshold of each configuration in OUT/final/best.pt")
    _add_run_settings(p, "data root (its train list is cross-validated; its test split is not read)")
    p.set_defaults(func=_cmd_cv)


def _cmd_cv(args) -> int:
    from ptanet.cv import CV_COLUMNS, cross_validate
    from ptanet.tables import render

    settings = _run_settings(args, out="runs/cv")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # --only "" trains no fold: it prepares the caches (before parallel processes start) or summarises.
    only = [int(f) for f in args.only.split(",") if f.strip()] if args.only is not None else None
    result = cross_validate(settings, settings.out, k=args.folds, seeds=seeds, configs=args.configs,
                            target=args.target, only=only, transfer=args.transfer_data)
    if result["pending"]:
        print(f"{len(result['pending'])} fold(s) still to train: {', '.join(result['pending'])}", file=sys.stderr)
        return 0
    print(render(result["rows"], CV_COLUMNS, "markdown"), end="")
    if result["transfer_rows"]:
        from ptanet.cv import TRANSFER_COLUMNS

        print("\n" + render(result["transfer_rows"], TRANSFER_COLUMNS, "markdown"), end="")
    print(f"wrote {settings.out}/cv.md, cv.json, cv.csv, oof_scores.json"
          + (", transfer.md/json/csv" if result["transfer_rows"] else ""), file=sys.stderr)
    if args.final:
        from ptanet.cv import final_model

        final = final_model(settings, settings.out, args.target)
        print(f"final model (best epoch {final['best_epoch']}): {final['checkpoint']}", file=sys.stderr)
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
    p = sub.add_parser("evaluate", help="paper Table 3 for checkpoints or exported models on their test split")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (e.g. RUN/best.pt) or exported models (.onnx, "
                   "switchable folder); several make one table")
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

    rows = evaluate_checkpoints(args.checkpoints, parse_configs(args.configs) if args.configs else None, data=args.data,
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
    p = sub.add_parser("export", help="ONNX: one switchable folder holding every configuration (default), one "
                       "switchable file, or one file per configuration, verified against PyTorch on real crops",
                       description="Default: OUT/model_switchable/, every configuration in one folder that switches "
                       "at run time (one graph per configuration, one shared weights file; a No PTA checkpoint: "
                       "OUT/model_baseline.onnx). --single-file: OUT/model_switchable.onnx, one graph with an If per "
                       "configuration. --per-config: one static file per configuration plus manifest.json. --int8: "
                       "per configuration fp32 and INT8 files.")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--configs", help="paper (default), all, or a list like HHH,LLL (ignored for No PTA)")
    p.add_argument("--single-file", action="store_true", help="one switchable .onnx file (If per configuration: "
                   "less memory, a little slower per image than the folder)")
    p.add_argument("--per-config", action="store_true", help="one static file per configuration + manifest.json")
    p.add_argument("--int8", action="store_true", help="also static INT8 (QDQ) files, calibrated per configuration")
    p.add_argument("--int8-per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--int8-activation", choices=("U8", "S8"), default="U8", help="activation type (default U8)")
    p.add_argument("--int8-reduce-range", action="store_true", help="7-bit weights (onnxruntime reduce_range)")
    p.add_argument("--threshold", type=float, help="spoof threshold recorded in the metadata (default: the one "
                   "ptanet calibrate stored with the checkpoint, else none: consumers use 0.5)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1 (--per-config)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    import json
    from pathlib import Path

    from ptanet.checkpoint import load_checkpoint
    from ptanet.export import (SWITCHABLE_DIR, SWITCHABLE_NAME, export_all, export_int8, export_onnx,
                               export_switchable, export_switchable_folder, onnx_filename)
    from ptanet.models import is_pta

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    ck = load_checkpoint(args.checkpoint)
    if args.int8:
        result = export_int8(ck, args.out, configs=args.configs, per_channel=not args.int8_per_tensor,
                             activation=args.int8_activation, reduce_range=args.int8_reduce_range)
        if ck.meta.get("settings"):  # the test split it was trained with: ACER change and speed
            from ptanet.bench import INT8_COLUMNS, int8_report

            try:
                rows = int8_report(ck, args.out, [r["config"] for r in result if r["config"]])
            except (OSError, ValueError) as exc:
                print(f"ptanet export: no test ACER ({exc})", file=sys.stderr)
            else:
                _print_table(rows, INT8_COLUMNS, "markdown", str(Path(args.out) / "int8"))
    elif args.per_config:
        result = export_all(ck, args.out, configs=args.configs, opset=args.opset, dynamic_batch=not args.static_batch,
                            threshold=args.threshold)
    elif is_pta(ck.model) and args.single_file:
        result = export_switchable(ck, Path(args.out) / SWITCHABLE_NAME, configs=args.configs, opset=args.opset,
                                   threshold=args.threshold)
    elif is_pta(ck.model):
        result = export_switchable_folder(ck, Path(args.out) / SWITCHABLE_DIR, configs=args.configs,
                                          opset=args.opset, threshold=args.threshold)
    else:
        if args.configs:
            raise ValueError(f"{args.checkpoint}: the model has no PTA blocks; leave out --configs")
        result = export_onnx(ck, Path(args.out) / onnx_filename(ck.config), opset=args.opset, threshold=args.threshold)
    print(json.dumps(result, indent=2))
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="live/spoof scores for images or videos (a checkpoint or an exported .onnx)",
                       description="Images: one row each (box file, else the largest detected face, else the whole "
                       "image). Videos (.avi, .mp4, ...): every --every-th frame is checked, every face of it, "
                       "printed as one JSON line per frame with a per-track decision over the last --window frames.")
    p.add_argument("model", help="checkpoint (.pt) or ONNX file (static or switchable)")
    p.add_argument("images", nargs="+", help="image files, folders or video files")
    p.add_argument("--config", help="PTA configuration to run (default: the model's)")
    p.add_argument("--detect", help="find the face: haar (bundled with OpenCV) or yunet:PATH.onnx (videos: default haar)")
    p.add_argument("--no-box-files", action="store_true", help="ignore <image>_BB.txt boxes beside the images")
    p.add_argument("--threshold", type=float, help="spoof if score >= threshold (default: the model's stored "
                   "threshold from ptanet calibrate, else 0.5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--every", type=int, default=1, help="videos: check every k-th frame (default: 1)")
    p.add_argument("--window", type=int, default=5, help="videos: a track's decision is the mean score of its "
                   "last n checked frames (default: 5)")
    _add_format(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    import json
    from pathlib import Path

    from ptanet.infer import Predictor
    from ptanet.liveness import VIDEO_EXTENSIONS, LivenessChecker, check_video

    videos = [v for v in args.images if Path(v).suffix.lower() in VIDEO_EXTENSIONS]
    images = [v for v in args.images if v not in videos]
    if videos and images:
        raise ValueError("give either images or videos, not both (videos print JSON lines)")
    if videos:
        checker = LivenessChecker(args.model, detect=args.detect or "haar", config=args.config, threshold=args.threshold)
        for video in videos:
            for frame in check_video(checker, video, every=args.every, window=args.window):
                print(json.dumps(frame), flush=True)
        return 0
    predictor = Predictor(args.model, config=args.config, detect=args.detect, threshold=args.threshold,
                          box_files=not args.no_box_files)
    rows = predictor.predict_paths(args.images, batch_size=args.batch_size)
    _print_table(rows, [("path", "Image", "str"), ("label", "Label", "str"), ("score", "Spoof score", "f3"),
                        ("config", "Config", "str"), ("box_source", "Box", "str"), ("error", "Error", "str")], args.format)
    return 1 if any(r.get("error") for r in rows) else 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency per configuration in PyTorch eager, ONNX Runtime fp32 and INT8 "
                       "(paper Table 4 on this machine); --adaptive: the latency-budget controller under load")
    p.add_argument("checkpoint", nargs="?", help="PTA checkpoint (default: a freshly initialised model; latency "
                   "does not depend on the weights)")
    p.add_argument("--configs", help="paper (default), all, or a list like HHH,LLL")
    p.add_argument("--runtimes", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime, int8")
    p.add_argument("--int8-dir", help="folder of model_<CONFIG>.int8.onnx files (ptanet export --int8) for runtime int8")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=300, help="timed batch-1 runs per model (default 300)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-runs", type=int, default=10, help="timed batch-32 runs per model")
    p.add_argument("--no-bbb-variant", action="store_true",
                   help="skip timing BBB a second time with its average as an explicit multiply")
    p.add_argument("--ort-optimization", choices=("basic", "extended", "all"), default="all",
                   help="onnxruntime graph optimisation level (default all, what deployments use)")
    p.add_argument("--artifact", action="store_true",
                   help="instead: compare the switchable folder and the switchable file with the six static files "
                   "(size, resident memory, switch time, latency)")
    p.add_argument("--int8-options", action="store_true",
                   help="instead: INT8 variants (per-channel/per-tensor, U8S8/S8S8, reduce_range) per configuration: "
                   "parity with fp32 on real crops and latency")
    p.add_argument("--adaptive", action="store_true",
                   help="instead: the adaptive controller against fixed HHH while a CPU burner starts and stops")
    p.add_argument("--budget-ms", type=float, help="--adaptive: latency budget (default 1.3 x HHH's quiet p90)")
    p.add_argument("--frames", type=int, default=3000, help="--adaptive: frames per runner (default: 3000)")
    p.add_argument("--out", help="write OUT.md/.json/.csv (and OUT.png plots)")
    _add_format(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json
    from pathlib import Path

    from ptanet import bench
    from ptanet.atomic import write_json_atomic
    from ptanet.configs import parse_configs

    configs = parse_configs(args.configs)
    if args.threads < 1 or args.runs < 1 or args.rounds < 1:
        raise ValueError("--threads, --runs and --rounds must be at least 1")
    if args.artifact or args.adaptive or args.int8_options:
        if not args.checkpoint:
            raise ValueError("--artifact, --adaptive and --int8-options need a PTA checkpoint")
        if args.int8_options:
            result = {"rows": bench.int8_options(args.checkpoint, configs)}
            columns = bench.INT8_OPTION_COLUMNS
        elif args.artifact:
            result = bench.compare_artifacts(args.checkpoint, configs, threads=args.threads)
            columns = bench.ARTIFACT_COLUMNS
        else:
            result = bench.adaptive_benchmark(args.checkpoint, configs, budget_ms=args.budget_ms, frames=args.frames,
                                              threads=args.threads, plot=f"{args.out}.png" if args.out else None)
            columns = bench.ADAPTIVE_COLUMNS
        _print_table(result["rows"], columns, args.format, args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2, default=str), file=sys.stderr)
        if args.out:  # OUT.json holds the table's rows; the rest (timeline, environment) beside it
            write_json_atomic(f"{args.out}.details.json", {k: v for k, v in result.items() if k != "rows"}, indent=2)
        return 0
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(runtimes) - {"torch", "onnxruntime", "int8"})
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; use torch, onnxruntime, int8")
    if "int8" in runtimes and not args.int8_dir:
        raise ValueError("--runtimes int8 needs --int8-dir (the folder ptanet export --int8 wrote)")
    result = bench.benchmark(args.checkpoint, configs, runtimes, threads=args.threads, runs=args.runs,
                             rounds=args.rounds, warmup=args.warmup, batch_runs=args.batch_runs,
                             int8_dir=args.int8_dir, bbb_variant=not args.no_bbb_variant,
                             optimization=args.ort_optimization)
    _print_table(result["rows"], bench.BENCH_COLUMNS, args.format, args.out)
    ratios = bench.speed_ratios(result["rows"])
    print(_render(ratios, [("ratio", "Ratio", "str"), ("value", "Measured", "f3"), ("target", "Target", "str")]), file=sys.stderr)
    print(json.dumps(result["environment"]), file=sys.stderr)
    if args.out:
        write_json_atomic(f"{args.out}.details.json", {"environment": result["environment"], "ratios": ratios}, indent=2)
        bench.plot_latency_vs_macs(result["rows"], f"{args.out}.png")
    return 0


def _render(rows, columns) -> str:
    from ptanet.tables import render

    return render(rows, columns, "markdown")


def _add_select(sub) -> None:
    p = sub.add_parser("select", help="pick the configuration with the best validation quality within a latency budget",
                       description="Reads latencies from a bench JSON (--bench) or measures them here, quality from "
                       "--quality (ptanet evaluate --split val's table3.json) or the model's recorded validation; "
                       "prints the speed/quality Pareto front and the choice.")
    p.add_argument("model", help="checkpoint or exported .onnx (for its recorded validation quality and multiply-adds)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=float, help="latency budget in ms (batch 1)")
    budget.add_argument("--budget-rel", type=float, help="latency budget as a fraction of HHH's")
    p.add_argument("--bench", help="bench rows (ptanet bench --out X writes X.json); default: measure here")
    p.add_argument("--runtime", default="onnxruntime", help="which runtime's latencies to use (default onnxruntime)")
    p.add_argument("--quality", help="table3.json of ptanet evaluate --split val (recalibrated BN, threshold 0.5 rows)")
    p.add_argument("--configs", help="paper, or all (default: all 27)")
    p.add_argument("--cost", choices=("latency", "macs"), default="latency", help="Pareto front by latency or multiply-adds")
    p.add_argument("--runs", type=int, default=100, help="timed runs per configuration when measuring here")
    p.add_argument("--out", help="write OUT.md/.json/.csv of the front")
    _add_format(p)
    p.set_defaults(func=_cmd_select)


def _cmd_select(args) -> int:
    from ptanet.bench import SELECT_COLUMNS, selection_rows
    from ptanet.configs import parse_configs
    from ptanet.runtime import pareto_front, select_config

    configs = parse_configs(args.configs or "all")
    rows = selection_rows(args.model, configs, bench_json=args.bench, runtime=args.runtime, quality_json=args.quality,
                          runs=args.runs)
    cost = "latency_ms" if args.cost == "latency" else "mops"
    front = pareto_front(rows, cost=cost)
    if not front:
        raise ValueError(f"{args.model}: no recorded validation quality for any configuration; run ptanet evaluate "
                         "--split val --configs all and pass its table3.json with --quality")
    if args.budget_ms is not None and args.budget_ms <= 0 or args.budget_rel is not None and args.budget_rel <= 0:
        raise ValueError("the budget must be positive")
    chosen = select_config(rows, args.budget_ms, args.budget_rel)
    for row in front:
        row["chosen"] = "<-" if row["config"] == chosen["config"] else ""
    _print_table(front, SELECT_COLUMNS, args.format, args.out)
    acer = "n/a" if chosen.get("acer") is None else f"{100 * chosen['acer']:.2f} %"
    print(f"chosen: {chosen['config']} ({chosen['latency_ms']:.3f} ms, validation ACER {acer})")
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="pick the spoof threshold on a labelled folder and store it with the model",
                       description="Scores the images under folders named live and spoof in FOLDER (box files beside the images, else "
                       "--detect, else the whole image), picks the threshold for --target and writes it into the "
                       "model file (meta['threshold'] of a checkpoint, 'threshold' metadata of an ONNX file), "
                       "atomically. predict, the Python API and serve then use it unless given --threshold.")
    p.add_argument("model", help="checkpoint (.pt) or ONNX file")
    p.add_argument("--data", required=True, help="folder with images under live/ and spoof/ folders (any depth) from your camera")
    p.add_argument("--target", required=True, help="apcer=RATE (highest threshold with APCER <= RATE), "
                   "bpcer=RATE (lowest threshold with BPCER <= RATE) or eer")
    p.add_argument("--out", help="write the calibrated model here instead of replacing MODEL")
    p.add_argument("--config", help="PTA configuration to calibrate (default: the model's)")
    p.add_argument("--detect", help="face detector for images without box files: haar or yunet:PATH.onnx")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    import json

    from ptanet.calibrate import calibrate

    result = calibrate(args.model, args.data, args.target, out=args.out, config=args.config, detect=args.detect)
    for problem in result.pop("skipped"):
        print(f"skipped: {problem}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def _add_fit_detector(sub) -> None:
    p = sub.add_parser("fit-detector", help="fit a face detector's box correction on a data set's train split, "
                       "measure it on its test split",
                       description="Pairs the detector's largest face with the data set's box on the train images, "
                       "fits the correction (least squares) and measures on the test images: box IoU and, with "
                       "--model, the share of decisions equal to those with the data set's boxes.")
    p.add_argument("--data", required=True, help="CelebA-layout data root with box files, e.g. ../shared/data/nuaa-dev")
    p.add_argument("--detect", required=True, help="haar or yunet:PATH.onnx")
    p.add_argument("--model", help="checkpoint or ONNX file for the decision agreement")
    p.add_argument("--protocol", default="intra_test")
    p.add_argument("--write", nargs="?", const="", metavar="FILE",
                   help="store the fitted correction: in FILE, or without FILE in the package's detectors.json")
    p.set_defaults(func=_cmd_fit_detector)


def _cmd_fit_detector(args) -> int:
    import json

    from ptanet.detect import parse_detect_spec
    from ptanet.detector_fit import fit_detector, store_correction

    entry = fit_detector(args.data, args.detect, model=args.model, protocol=args.protocol)
    print(json.dumps(entry, indent=2))
    if args.write is not None:
        path = store_correction(parse_detect_spec(args.detect)[0], entry, args.write or None)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP liveness service with a web page (needs the [serve] extra)",
                       description="POST /v1/liveness, GET /v1/configs, PUT /v1/config, /healthz, /readyz, "
                       "OpenAPI docs at /docs and a web page at /. Stops gracefully on SIGTERM or Ctrl-C.")
    p.add_argument("model", help="checkpoint (.pt) or ONNX file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--detect", default="haar", help="haar (default) or yunet:PATH.onnx")
    p.add_argument("--config", help="PTA configuration at start (default: the model's)")
    p.add_argument("--threshold", type=float, help="default: the model's stored threshold, else 0.5")
    p.add_argument("--max-body", type=int, default=10 * 1024 * 1024, help="largest request body in bytes (default 10 MiB)")
    p.add_argument("--max-pixels", type=int, help="largest decoded image in pixels (default: ptanet's limit)")
    p.add_argument("--queue", type=int, default=16, help="requests in flight or waiting; beyond: 503 (default 16)")
    p.add_argument("--workers", type=int, default=2, help="threads that decode and check images (default 2)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (ONNX models)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    try:
        from ptanet.serve.app import run_server
    except ImportError as exc:
        raise RuntimeError(f"serve needs the [serve] extra (pip install 'ptanet[serve]'): {exc}") from None
    run_server(args.model, host=args.host, port=args.port, detect=args.detect, config=args.config,
               threshold=args.threshold, max_body=args.max_body, max_pixels=args.max_pixels, queue=args.queue,
               workers=args.workers, threads=args.threads)
    return 0


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
