"""Training speed (paper Table 5's comparison): images/s of PTA (Table 2 sampling) and No PTA training on
this device and process count, for the loader alone, the model alone and both together.

The three measurements tell where the time goes: *loader* is the training DataLoader (memory-mapped
crop cache, augmentation, collation, copy to the device) with no model; *model* is forward, backward
and the Adam step on one batch already on the device; *both* is the real loop. Each is the median of
``repeats`` timed windows of ``steps`` steps after ``warmup`` steps. Under torchrun every process
runs its share of the global batch through DDP and the figures are for all processes together.
The PTA / No PTA time ratio is paper Table 5's (43.11 / 49.28 = 0.875 minutes per epoch on a GTX 1050 Ti).
"""

from __future__ import annotations

import statistics
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler

from ptanet.configs import PAPER_SAMPLING, ConfigSampler
from ptanet.data import CropCache, CropDataset
from ptanet.models import CHANNELS_LAST, create_model, is_pta, to_fast_layout
from ptanet.train import distributed
from ptanet.train.device import Precision, default_workers, loader_options, resolve_precision, to_device

MODELS = {"PTA (Table 2 sampling)": "pta_mobilenet_v2", "No PTA": "mobilenet_v2"}
MODEL_NAMES = {"pta": "PTA (Table 2 sampling)", "no-pta": "No PTA"}
PARTS = ("loader", "model", "both")
BENCH_TRAIN_COLUMNS = [
    ("model", "Model", "str"), ("part", "Measured", "str"), ("images_per_s", "Images/s", "f2"),
    ("epoch_min", "Epoch (min)", "f2"), ("ratio", "PTA / No PTA time", "f3"),
]


def _cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(steps: Iterator[int], n: int, device: torch.device) -> float:
    """Seconds for the next ``n`` steps of ``steps`` (each yields its batch size), queue drained."""
    _cuda_sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        next(steps)
    _cuda_sync(device)
    return time.perf_counter() - t0


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # a new pass when the sampler runs out
        yield from loader


def bench_train(cache: CropCache, batch_size: int = 256, steps: int = 20, warmup: int = 5, repeats: int = 3,
                workers: int | None = None, device: str = "auto", precision: str = "auto", compile: bool = False,
                ddp_unused: str = "zero", epoch_images: int | None = None, seed: int = 0,
                parts: tuple[str, ...] = PARTS, models: tuple[str, ...] = tuple(MODEL_NAMES),
                progress=print) -> list[dict]:
    """Rows per model (``pta``, ``no-pta``) and part (see the module doc): images/s over all processes and
    minutes per epoch of ``epoch_images`` images (default: the cache's size); ``ratio`` on PTA's rows is
    its time over No PTA's."""
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(models) - set(MODEL_NAMES))
    if unknown or not parts or not models:
        raise ValueError(f"bench-train measures parts of {list(PARTS)} for models of {list(MODEL_NAMES)}; "
                         f"got {unknown or 'none'}")
    dist = distributed.start(device)
    try:
        dev = dist.device
        per_rank = distributed.RankBatchSampler(range(batch_size), batch_size, dist.rank, dist.world_size).per_rank
        workers = default_workers(dev, dist.local_world_size) if workers is None else workers
        prec = Precision(dev, resolve_precision(precision, dev))
        dataset = CropDataset(cache, cache.preprocess, augment=True, seed=seed, stream=dist.rank)
        sampler = RandomSampler(dataset, replacement=True, num_samples=max(len(dataset), 8 * batch_size),
                                generator=torch.Generator().manual_seed(seed + dist.rank))
        loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                            persistent_workers=workers > 0, **loader_options(dev, workers, 4))
        images_per_epoch = epoch_images or len(cache)
        batches = _batches(loader)

        def loader_steps():
            while True:
                images, labels = next(batches)
                to_device(images, labels, dev)
                yield per_rank

        def measure(make_steps) -> float:
            it = make_steps()
            _timed(it, warmup, dev)
            rates = [per_rank * steps / _timed(it, steps, dev) for _ in range(repeats)]
            (total,) = dist.sum(torch.tensor(statistics.median(rates), dtype=torch.float64, device=dev))
            return float(total)

        rows = [{"model": "(any)", "part": "loader", "images_per_s": measure(loader_steps)}] if "loader" in parts else []
        for label, arch in MODELS.items():
            if label not in {MODEL_NAMES[m] for m in models} or parts == ("loader",):
                continue
            torch.manual_seed(seed)
            model = to_fast_layout(create_model(arch)).to(dev).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            unused = distributed.UnusedBranches(model, ddp_unused) if dist.enabled else None
            net = model
            if dist.enabled:
                net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                              find_unused_parameters=unused.find_unused_parameters)
            if compile:
                net = torch.compile(net)
            configs = ConfigSampler(PAPER_SAMPLING, [seed, 0, 2]) if is_pta(model) else None
            fixed = to_device(*next(batches), dev)

            def step(images, labels):
                if configs:
                    model.set_config(configs.sample())
                with prec.autocast():
                    logits = net(images)
                prec.step(F.cross_entropy(logits.float(), labels), optimizer, unused)

            def model_steps():
                while True:
                    step(*fixed)
                    yield per_rank

            def both_steps():
                while True:
                    step(*to_device(*next(batches), dev, CHANNELS_LAST))
                    yield per_rank

            for part, make in (("model", model_steps), ("both", both_steps)):
                if part not in parts:
                    continue
                progress(f"bench-train: {label}, {part} ...")
                rows.append({"model": label, "part": part, "images_per_s": measure(make)})
        no_pta = {r["part"]: r["images_per_s"] for r in rows if r["model"] == "No PTA"}
        for row in rows:
            row["epoch_min"] = images_per_epoch / row["images_per_s"] / 60
            if row["model"] == next(iter(MODELS)) and row["part"] in no_pta:
                row["ratio"] = no_pta[row["part"]] / row["images_per_s"]  # time PTA / time No PTA
            row.update(device=str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                       processes=dist.world_size, batch_size=batch_size, workers=workers, precision=prec.name,
                       compile=compile, epoch_images=images_per_epoch, ddp_unused=ddp_unused)
        return rows
    finally:
        dist.close()
