"""ResNet v2 (pre-activation) laid out like TF-slim's ``resnet_v2``, the paper's trunk.

Differences from torchvision's (v1) ResNet that matter for faithfulness:

* pre-activation units: ``BN -> ReLU`` comes *before* each convolution, the unit output is
  an un-normalised sum ``shortcut + residual``;
* the stride-2 of blocks 1–3 sits in the **last** unit of the block (torchvision: the first);
* root: 7×7/2 convolution with bias and no BN/ReLU, then a 3×3/2 max-pool with TF "SAME"
  padding; the last 1×1 convolution of each unit and projection shortcuts have biases;
* BN epsilon 1e-5; input RGB 0–255 minus ``[123.68, 116.779, 103.939]``.

``output_stride`` follows slim: once the running stride reaches it, later units use stride 1
and dilate their 3×3 convolutions instead.

Slim's ``resnet_v2_N/block3`` end-point (the paper's released representation) is
``ResNetV2("v2_N", output_stride=None, final_norm=False)``: native stride 32, the raw
(pre-activation) output of block 3's last unit; ``final_norm=True`` with ``last_block=4`` is
slim's ``postnorm`` output. ``tests/slim/test_slim_parity.py`` checks both, and every unit of block 3,
against TF-slim's own ``resnet_v2_50``/``resnet_v2_101`` (native stride and ``output_stride=16``)
to 1e-4 relative error; :mod:`mtssl_lightning.slim` converts slim checkpoints.
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from mtssl_lightning.trunks.base import PixelNormalize, Trunk, TrunkOutput

SLIM_MEAN_RGB = (123.68, 116.779, 103.939)

UnitKind = Literal["basic", "bottleneck"]

#: name -> (unit kind, units per block 1..4). 50/101/152 are TF-slim's counts; 18/26 follow the
#: usual "v2-18/26 style" counts; ``tiny`` exists for CPU tests and the quickstart.
PRESETS: dict[str, tuple[UnitKind, tuple[int, int, int, int]]] = {
    "tiny": ("bottleneck", (1, 1, 2, 1)),
    "v2_18": ("basic", (2, 2, 2, 2)),
    "v2_26": ("bottleneck", (2, 2, 2, 2)),
    "v2_50": ("bottleneck", (3, 4, 6, 3)),
    "v2_101": ("bottleneck", (3, 4, 23, 3)),
    "v2_152": ("bottleneck", (3, 8, 36, 3)),
}

BASE_DEPTHS = (64, 128, 256, 512)  # bottleneck width of each block; output = 4x for bottleneck
BLOCK_STRIDES = (2, 2, 2, 1)  # slim resnet_v2: stride in the last unit of blocks 1-3


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width)))


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=momentum)


class _UnitV2(nn.Module):
    """One pre-activation residual unit (basic: 3×3, 3×3; bottleneck: 1×1, 3×3, 1×1)."""

    def __init__(
        self,
        kind: UnitKind,
        in_channels: int,
        out_channels: int,
        mid_channels: int,
        stride: int,
        dilation: int,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.preact = _bn(in_channels, bn_momentum)
        # slim: identity (subsampled) shortcut when depths agree, else a 1x1 conv on the preactivation
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=True)
            if in_channels != out_channels
            else None
        )
        if kind == "bottleneck":
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                _bn(mid_channels, bn_momentum),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid_channels, mid_channels, 3, stride, padding=dilation, dilation=dilation, bias=False),
                _bn(mid_channels, bn_momentum),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid_channels, out_channels, 1, bias=True),
            )
        else:
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False),
                _bn(out_channels, bn_momentum),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=True),
            )

    def forward(self, x: Tensor) -> Tensor:
        preact = F.relu(self.preact(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        else:
            shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        return shortcut + self.body(preact)


def _init_convs(module: nn.Module) -> None:
    """He-normal (fan-out) convolution weights, zero biases; BN keeps PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def max_pool_same(x: Tensor, kernel: int = 3, stride: int = 2) -> Tensor:
    """Max-pool with TensorFlow "SAME" padding: output ``ceil(H / stride)``, extra pad at the end.

    ``(B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))``.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, stride)


class ResNetV2(Trunk):
    """Pre-activation ResNet cut after ``last_block``, returning block and unit outputs.

    Args:
        depth: a preset name (see ``PRESETS``: ``tiny``, ``v2_18``, ``v2_26``, ``v2_50``,
            ``v2_101``, ``v2_152``); ignored where ``units`` is given.
        units: units per block (4 numbers), to override the preset's counts.
        unit: ``"bottleneck"`` or ``"basic"``, used with ``units``.
        width: multiplier on every channel count (0.25 makes a CPU-sized trunk).
        last_block: cut after this block (1–4; the paper uses 3).
        output_stride: slim's output stride, a cap on the stride (None = natural stride, 32
            after block 3; a cap above the natural stride of a shallow cut changes nothing).
            The default 16 removes the stride of block 3's last unit, so that all units of
            block 3 have one shape as the lasso needs (an assumption: the paper mixes them).
        final_norm: apply BN+ReLU to the block output before heads read it (slim's
            ``postnorm``; unit outputs stay raw).
        bn_momentum: PyTorch BN momentum (slim's decay 0.997 is momentum 0.003; we default to
            0.1 so that short runs get usable running statistics).

    Input ``(B, 3, H, W)`` RGB in ``[0, 1]``; output :class:`TrunkOutput` with ``features``
    ``(B, out_channels, ceil(H / out_stride), ceil(W / out_stride))``.
    """

    def __init__(
        self,
        depth: str = "v2_101",
        units: list[int] | None = None,
        unit: UnitKind = "bottleneck",
        width: float = 1.0,
        last_block: int = 3,
        output_stride: int | None = 16,
        final_norm: bool = True,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.init_args = dict(
            depth=depth, units=None if units is None else list(units), unit=unit, width=width,
            last_block=last_block, output_stride=output_stride, final_norm=final_norm, bn_momentum=bn_momentum,
        )
        if units is None:
            if depth not in PRESETS:
                raise ValueError(f"unknown ResNetV2 depth {depth!r}; choose one of {sorted(PRESETS)} or give `units`")
            unit, unit_counts = PRESETS[depth]
        else:
            unit_counts = tuple(units)
            if len(unit_counts) != 4 or min(unit_counts) < 1:
                raise ValueError(f"`units` must be 4 positive unit counts (blocks 1-4), got {units}")
        if not 1 <= last_block <= 4:
            raise ValueError(f"`last_block` must be 1-4, got {last_block}")
        if output_stride is not None and (output_stride < 4 or output_stride & (output_stride - 1)):
            raise ValueError(f"`output_stride` must be a power of two >= 4 (or null), got {output_stride}")
        if width <= 0:
            raise ValueError(f"`width` must be positive, got {width}")

        self.depth, self.unit_kind, self.unit_counts = depth, unit, unit_counts[:last_block]
        self.normalize = PixelNormalize(SLIM_MEAN_RGB, (1.0, 1.0, 1.0), scale=255.0)
        root_channels = _scaled(64, width)
        self.root = nn.Conv2d(3, root_channels, 7, stride=2, padding=3, bias=True)

        expansion = 4 if unit == "bottleneck" else 1
        blocks: list[nn.Sequential] = []
        in_ch, current_stride, rate = root_channels, 4, 1
        for b in range(last_block):
            mid = _scaled(BASE_DEPTHS[b], width)
            out_ch = mid * expansion
            layers = []
            for i in range(unit_counts[b]):
                stride = BLOCK_STRIDES[b] if i == unit_counts[b] - 1 else 1
                if output_stride is not None and current_stride == output_stride:
                    layers.append(_UnitV2(unit, in_ch, out_ch, mid, 1, rate, bn_momentum))
                    rate *= stride
                else:
                    layers.append(_UnitV2(unit, in_ch, out_ch, mid, stride, rate, bn_momentum))
                    current_stride *= stride
                in_ch = out_ch
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.Sequential(_bn(in_ch, bn_momentum), nn.ReLU()) if final_norm else nn.Identity()
        self.out_channels = in_ch
        self.out_stride = current_stride
        self.num_units = unit_counts[last_block - 1]
        self._init_weights()

    def _init_weights(self) -> None:
        _init_convs(self)

    def next_block(self, stride: int = 1) -> nn.Sequential:
        """A freshly initialised copy of the block that would follow the cut (block 4 after block 3).

        The transfer heads use it: the linear probe's "block 4 + linear" option and Faster
        R-CNN's per-RoI head. Units and width follow this trunk's preset; the stride-``stride``
        unit is the last one (slim's layout), and the block ends with BN+ReLU so it maps
        ``(N, out_channels, h, w)`` to ``(N, next_channels, h / stride, w / stride)`` features.

        Raises:
            ValueError: the trunk already ends with block 4.
        """
        b = len(self.unit_counts)
        if b >= 4:
            raise ValueError("this trunk already ends with block 4 (`last_block: 4`); there is no next block")
        units = self.init_args["units"] or PRESETS[self.depth][1]
        mid = _scaled(BASE_DEPTHS[b], self.init_args["width"])
        out_ch = mid * (4 if self.unit_kind == "bottleneck" else 1)
        momentum = self.init_args["bn_momentum"]
        layers: list[nn.Module] = []
        in_ch = self.out_channels
        for i in range(units[b]):
            layers.append(_UnitV2(self.unit_kind, in_ch, out_ch, mid, stride if i == units[b] - 1 else 1, 1, momentum))
            in_ch = out_ch
        block = nn.Sequential(*layers, _bn(out_ch, momentum), nn.ReLU())
        _init_convs(block)
        block.out_channels = out_ch  # type: ignore[assignment]
        return block

    def forward(self, x: Tensor) -> TrunkOutput:
        x = max_pool_same(self.root(self.normalize(x)))
        for block in self.blocks[:-1]:
            x = block(x)
        units: list[Tensor] = []
        for unit in self.blocks[-1]:
            x = unit(x)
            units.append(x)
        return TrunkOutput(features=self.final_norm(x), units=units)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, units={self.unit_counts}, out_channels={self.out_channels}, out_stride={self.out_stride}"


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

