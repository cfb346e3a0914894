"""Head parts shared by several tasks, with deterministic backward passes on CUDA.

``torch.use_deterministic_algorithms(True)`` (``trainer.deterministic: true``) raises on CUDA for
the backward of ``AdaptiveAvgPool2d`` and of bilinear ``F.interpolate`` (atomic adds): the heads
pool with a mean (:class:`GlobalAvgPool`) and upsample with two small matrix products
(:func:`resize_bilinear`, the same values as ``F.interpolate(mode="bilinear",
align_corners=False)``), whose backward passes are deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtssl_lightning.tensor_cache import tensor_cache

__all__ = ["DenseHead", "GlobalAvgPool", "bilinear_matrix", "resize_bilinear"]


class GlobalAvgPool(nn.Module):
    """``(N, C, h, w)`` -> ``(N, C)``: the mean over space (``AdaptiveAvgPool2d(1)`` + flatten, with a
    deterministic backward on CUDA)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


def bilinear_matrix(size_in: int, size_out: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(size_out, size_in)`` weights of 1-D linear interpolation with half-pixel centres, as
    ``F.interpolate(mode="bilinear", align_corners=False)`` computes them (no antialiasing).

    Source coordinate of output ``i``: ``max((i + 0.5) · in / out − 0.5, 0)``; its two neighbours
    ``⌊s⌋`` and ``min(⌊s⌋ + 1, in − 1)`` get ``1 − frac`` and ``frac``. Built with tensor ops on
    ``device`` (no copy from the host).
    """
    scale = size_in / size_out
    source = ((torch.arange(size_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    low = source.floor().clamp(max=size_in - 1)
    frac = source - low
    low = low.long()
    high = (low + 1).clamp(max=size_in - 1)
    weights = torch.zeros(size_out, size_in, device=device, dtype=torch.float64)
    rows = torch.arange(size_out, device=device)
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.to(dtype)


@tensor_cache(maxsize=64)
def _cached_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return bilinear_matrix(size_in, size_out, device, dtype)


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N, C, h, w)`` -> ``(N, C, H, W)`` bilinear, as ``F.interpolate(x, size, mode="bilinear",
    align_corners=False)``, as two matrix products (deterministic backward on CUDA)."""
    rows = _cached_matrix(x.shape[-2], size[0], x.device, x.dtype)
    cols = _cached_matrix(x.shape[-1], size[1], x.device, x.dtype)
    return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


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
            x = resize_bilinear(x, size)
        return self.classify(self.refine(x))
