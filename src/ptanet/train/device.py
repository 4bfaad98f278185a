"""Where and in what precision a run computes: the device, mixed precision, and the loader options
that go with them.

The CPU path is the reference and stays exactly the paper's fp32 computation: nothing here changes a
CPU run's numbers. On CUDA a run uses autocast (bf16 where the GPU supports it, else fp16 with a
gradient scaler, whose state is resumed), channels-last tensors (already the models' layout), pinned
host memory with non-blocking copies, and DataLoader workers that prefetch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without CUDA is refused with the reason.
    Under torchrun each process takes the GPU of its local rank."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device 'cuda' asked for, but no CUDA GPU is usable here (PyTorch {torch.__version__}, "
                         f"{build}); use --device cpu or --device auto")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible; start at "
                         "most one process per GPU (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 (always on the CPU: its results stay the paper's)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise ValueError(f"precision {name!r} is for CUDA; the CPU trains in fp32 (use --precision auto or fp32)")
        return None
    if name == "fp32":
        return None
    if name == "bf16" or (name == "auto" and torch.cuda.is_bf16_supported()):
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bf16; use --precision fp16")
        return torch.bfloat16
    return torch.float16


def default_workers(device: torch.device, processes_per_node: int = 1) -> int:
    """DataLoader workers when none are given: 0 on the CPU (the cache is read far faster than the
    CPU trains, and workers would take cores from the model), else the node's cores shared among its
    processes, one left for each training process itself, at most 8."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, processes_per_node) - 1))


@dataclass
class Precision:
    """Autocast and gradient scaling for one device (both off on the CPU)."""

    device: torch.device
    dtype: torch.dtype | None

    def __post_init__(self) -> None:
        # fp16's narrow range needs loss scaling; bf16 has fp32's exponent and does not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, unused=None) -> None:
        """One optimisation step: zero the gradients, backward through the (scaled) loss, step.
        ``unused`` (distributed.UnusedBranches) adds its zero term for the branches left out under DDP
        and drops their zero gradients, so that Adam does not move them."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(unused.loss(loss) if unused else loss).backward()
        if unused:
            unused.drop_zero_grads()
        self.scaler.step(optimizer)
        self.scaler.update()


def loader_options(device: torch.device, workers: int, prefetch: int) -> dict:
    """DataLoader keyword arguments for ``device``: pinned memory (so that host-to-GPU copies can be
    non-blocking) and prefetching workers on CUDA; on the CPU only the worker count, as before."""
    options: dict = {"num_workers": workers}
    if device.type == "cuda":
        options["pin_memory"] = True  # for the current CUDA device (set per local rank)
    if workers > 0 and device.type == "cuda":
        options["prefetch_factor"] = prefetch
    return options


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              memory_format=torch.channels_last) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device`` in the models' layout; the copy overlaps compute (pinned source)."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)
