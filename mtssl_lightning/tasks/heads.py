"""Heads shared by several tasks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseHead"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DenseHead(nn.Module):
    """Dense prediction head (colorization, motion segmentation): 3×3 conv+BN+ReLU at the trunk
    stride, bilinear upsampling to the output resolution, 3×3 conv+BN+ReLU there, 1×1 conv to
    ``out_channels`` logits.

    ``(N, C, h, w)`` -> ``(N, out_channels, H/output_stride, W/output_stride)``; the output size
    is given by ``size`` (from the batch) or else ``h · stride / output_stride``.

    Args:
        channels: trunk feature channels C.
        stride: trunk output stride.
        out_channels: logits per output pixel (Q bins, or 1 for a binary mask).
        output_stride: input pixels per output pixel.
        hidden: width of the two hidden convolutions.
    """

    def __init__(self, channels: int, stride: int, out_channels: int, output_stride: int = 4, hidden: int = 256) -> None:
        super().__init__()
        self.scale = stride / output_stride
        self.reduce = _conv_bn_relu(channels, hidden)
        self.refine = _conv_bn_relu(hidden, hidden)
        self.classify = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        x = self.reduce(features)
        if size is None:
            size = (round(features.shape[-2] * self.scale), round(features.shape[-1] * self.scale))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classify(self.refine(x))
