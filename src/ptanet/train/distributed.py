"""Data-parallel training through torchrun: PyTorch's own process groups and DistributedDataParallel.

``torchrun --nproc-per-node N -m ptanet train ...`` (and its multi-node form) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in every process; :func:`start` reads them, joins the process group
(gloo on the CPU, NCCL on CUDA) and picks the process's GPU. Without them a run is one process and
nothing here does anything.

What keeps the ranks one run:

- ``--batch-size`` is the *global* batch. Every rank walks the same global order (drawn from the
  shared seed exactly as one process draws it, including the optional subject balancing) and takes
  its contiguous share of each global batch (:class:`RankBatchSampler`), so the rank count changes
  neither the epoch's batches nor the paper's recipe (batch 32, lr 1e-4).
- The PTA configuration of a step comes from a generator seeded with ``(seed, epoch)`` and advanced
  once per global step on every rank, so all ranks run the same branches (tested).
- Branches a configuration leaves out get no gradient. DDP must then be told (see
  :class:`UnusedBranches`): ``find`` lets DDP search the autograd graph each step
  (``find_unused_parameters=True``); ``zero`` adds a zero-valued term over the inactive branches so
  that every parameter takes part, then drops those zero gradients before the optimiser step, so
  Adam leaves the branches untouched as in one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, Sampler

from ptanet.blocks import PTABlock
from ptanet.train.device import resolve_device

UNUSED_MODES = ("zero", "find")
GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Distributed:
    """This process's place in the run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Sums over the ranks (the inputs themselves on one process)."""
        if not self.enabled:
            return list(values)
        out = []
        for value in values:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            out.append(value)
        return out

    def any(self, flag: torch.Tensor) -> bool:
        """True when ``flag`` (a bool tensor) is true on any rank: every rank stops together."""
        (total,) = self.sum(flag.to(torch.int32))
        return bool(total.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start(device_setting: str) -> Distributed:
    """Join the torchrun process group if this process is part of one; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(device_setting, local_rank if world > 1 else 0)
    if world <= 1:
        return Distributed(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        # Generous: the other ranks wait at a barrier while rank 0 validates, or while each node's first
        # process builds a missing crop cache (run `ptanet prepare` first for a large data set).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    return Distributed(rank, world, local_rank, local_world, owns, device)


class RankBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch that one process would draw from ``sampler``.

    ``sampler`` is the one-process sampler (a seeded shuffle or the weighted draw of ``--balance``);
    every rank iterates it whole, cuts it into global batches of ``batch_size`` (the last incomplete
    one dropped, as training always did) and yields the ``rank``-th contiguous slice of each.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is the global batch and must divide evenly among the "
                             f"{world_size} processes; use a multiple of {world_size}")
        self.sampler, self.batch_size, self.rank = sampler, batch_size, rank
        self.per_rank = batch_size // world_size

    def __iter__(self):
        start = self.rank * self.per_rank
        for batch in BatchSampler(self.sampler, self.batch_size, drop_last=True):
            yield batch[start:start + self.per_rank]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class UnusedBranches:
    """How a DDP step treats the branches that the step's configuration does not run (module doc)."""

    def __init__(self, model: nn.Module, mode: str, teacher: str | None = None) -> None:
        if mode not in UNUSED_MODES:
            raise ValueError(f"ddp_unused must be one of {list(UNUSED_MODES)}, got {mode!r}")
        self.model, self.mode = model, mode
        self.blocks = [m for m in model.modules() if isinstance(m, PTABlock)]
        # In-place distillation runs the teacher configuration too in every step: its branches are used.
        self.teacher = tuple(teacher) if teacher else None
        self._inactive: dict[tuple[str, ...], list[nn.Parameter]] = {}

    @property
    def find_unused_parameters(self) -> bool:
        return self.mode == "find" and bool(self.blocks)

    def inactive(self) -> list[nn.Parameter]:
        """Parameters of the branches the current configuration leaves out."""
        modes = tuple(block.mode for block in self.blocks)
        if modes not in self._inactive:
            left_out = {"H": "light", "L": "heavy", "B": None}
            also = self.teacher or modes
            self._inactive[modes] = [p for block, mode, other in zip(self.blocks, modes, also)
                                     if left_out[mode] and left_out[mode] == left_out[other]
                                     for p in getattr(block, left_out[mode]).parameters()]
        return self._inactive[modes]

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus zero times the inactive branches (``zero`` mode), so all of them take part."""
        if self.mode != "zero":
            return loss
        inactive = self.inactive()
        if not inactive:
            return loss
        return loss + torch.stack([p.sum() for p in inactive]).sum().to(loss.dtype) * 0.0

    def drop_zero_grads(self) -> None:
        """Inactive branches get no step at all (Adam's moments stay), as in one process."""
        if self.mode == "zero":
            for p in self.inactive():
                p.grad = None
