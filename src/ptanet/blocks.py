"""Building blocks: MobileNetV2's Inverted Residual block and the Post-Train Adaptive (PTA) block.

The layout (module nesting and therefore state-dict names) follows torchvision's
``InvertedResidual`` exactly, so MobileNetV2 weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv -> BatchNorm -> ReLU6 (torchvision's ``Conv2dNormActivation`` with MobileNetV2's settings)."""

    def __init__(self, inp: int, oup: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(inp, oup, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = oup


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN; residual when shapes allow.

    With ``expand_ratio == 1`` the expansion conv is omitted, as in MobileNetV2's first block.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        # Fixed at construction so forward() is straight-line code (and traces to one ONNX graph).
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class PTABlock(nn.Module):
    """Post-Train Adaptive block (paper Fig. 1): a Light branch (one Inverted Residual block) and a
    Heavy branch (two in sequence), with no shared weights.

    ``mode`` selects what runs: ``"H"`` heavy, ``"L"`` light, ``"B"`` both with outputs averaged
    element-wise (so the feature distribution stays that of one branch). Changing ``mode`` is an
    attribute write: no copies, no re-allocation, and the inactive branch costs nothing.
    """

    def __init__(self, channels: int, expand_ratio: int) -> None:
        super().__init__()
        # stride 1 and in == out: a PTA block replaces a pair of residual IR blocks (paper Table 1).
        self.light = InvertedResidual(channels, channels, 1, expand_ratio)
        self.heavy = nn.Sequential(
            InvertedResidual(channels, channels, 1, expand_ratio),
            InvertedResidual(channels, channels, 1, expand_ratio),
        )
        self.out_channels = channels
        self.mode = "H"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "H":
            return self.heavy(x)
        if self.mode == "L":
            return self.light(x)
        return (self.light(x) + self.heavy(x)) * 0.5

    def branches(self, mode: str) -> list[nn.Module]:
        """The sub-modules that ``mode`` executes."""
        return {"H": [self.heavy], "L": [self.light], "B": [self.light, self.heavy]}[mode]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class BothBranches(nn.Module):
    """A fixed ``B`` PTA block for static (exported) models: the element-wise mean of two branches,
    ``scale * (light(x) + heavy(x))``. ``scale`` is 1.0 where ``PTAMobileNetV2.to_static`` has moved
    the 0.5 into the next layer's convolution (same outputs, one graph node fewer)."""

    def __init__(self, light: nn.Module, heavy: nn.Module, scale: float = 0.5) -> None:
        super().__init__()
        self.light = light
        self.heavy = heavy
        self.scale = scale
        self.out_channels = heavy[-1].out_channels if isinstance(heavy, nn.Sequential) else heavy.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.light(x) + self.heavy(x)
        return out if self.scale == 1.0 else out * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
