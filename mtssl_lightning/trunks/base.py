"""The trunk interface shared by every backbone: one forward, block output plus unit outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

@dataclass
class TrunkOutput:
    """What a trunk returns.

    Attributes:
        features: ``(B, C, h, w)`` output of the trunk's last block (after the optional final
            BN+ReLU), the representation every head reads in "naive" mode.
        units: the raw outputs of every unit (residual block) of the last block, each
            ``(B, C, h_u, w_u)``; the lasso mixes them. With the default output stride of a
            ResNet-v2 trunk they all have the shape of ``features``.
    """

    features: Tensor
    units: list[Tensor]


class Trunk(nn.Module):
    """Base class of the shared trunks.

    Input: ``(B, 3, H, W)`` float RGB in ``[0, 1]`` (a Lab-L "harmonized" input is L/100
    replicated three times, so it lives in the same range). Each trunk converts that to its own
    convention (TF-slim's 0–255 minus the mean pixel, or torchvision's mean/std).

    Subclasses set ``out_channels`` (C of ``features``), ``out_stride`` (H / h for an input
    divisible by it) and ``num_units`` (length of ``TrunkOutput.units``).
    """

    out_channels: int
    out_stride: int
    num_units: int
    #: the constructor arguments, plain values only (recorded in checkpoints by ``spec()``)
    init_args: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuild this trunk (weights not included)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self.init_args)}

    def forward(self, x: Tensor) -> TrunkOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def apply_speed_options(trunk: nn.Module, channels_last: bool, compile: bool, compile_options: dict[str, Any] | None = None) -> None:
    """Channels-last memory format and/or ``torch.compile`` of ``trunk``, in place, on whatever
    device it will run (``nn.Module.compile`` keeps parameter names, so checkpoints do not change).

    Call it before a strategy wraps the model and before the optimizers are made (a LightningModule's
    ``configure_model``): DDP's gradient buckets and resumed optimizer states then have the final layout.
    Both also work on a CPU (the tests use that); a short CPU run spends more compiling than it saves.
    ``compile_options`` are ``torch.compile``'s keyword arguments (``mode``, ``backend``, ``dynamic`` …).
    """
    if channels_last:
        trunk.to(memory_format=torch.channels_last)
    if compile:
        trunk.compile(**(compile_options or {}))


class PixelNormalize(nn.Module):
    """``(x * scale - mean) / std`` with per-channel constants, stored as buffers (not trained)."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float], scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"trunk input must be (B, 3, H, W), got {tuple(x.shape)}")
        return (x * self.scale - self.mean.to(x.dtype)) / self.std.to(x.dtype)
