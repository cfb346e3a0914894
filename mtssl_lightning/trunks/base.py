"""The trunk interface shared by every backbone: one forward, block output plus unit outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


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


def apply_speed_options(trunk: nn.Module, device: torch.device, channels_last: bool, compile: bool) -> None:
    """On CUDA: channels-last memory format and/or ``torch.compile`` of ``trunk``, in place
    (``nn.Module.compile`` keeps parameter names, so checkpoints do not change). On any other
    device nothing happens: compilation costs more than it saves on a CPU."""
    if device.type != "cuda":
        if channels_last or compile:
            log.info("channels_last / compile are CUDA options; running the trunk as is on %s", device)
        return
    if channels_last:
        trunk.to(memory_format=torch.channels_last)
    if compile:
        trunk.compile()


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
