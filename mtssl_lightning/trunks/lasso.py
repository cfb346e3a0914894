"""Lasso unit mixing (Doersch & Zisserman 2017, sec. 3.2): each task reads its own linear
combination of the outputs of the units of the trunk's last block.

``mixed = BN+ReLU( Σ_u α_u · unit_u )``, with one trainable ``α`` per task and an L1 penalty
``λ Σ_u |α_u|`` added to the task's loss so that ``α`` becomes sparse (a task picks the depth it
likes). The units are the raw (pre-activation) residual-stream outputs; the BN+ReLU after the
mix plays the role of the trunk's final BN+ReLU in naive mode, one per task because each mix
has its own statistics (our assumption; the paper does not detail it).

Initialisation (our assumption; the paper does not state it): ``"last"`` puts all weight on
the last unit (the mix starts as the naive multi-head model's representation and the penalty
only has to keep the other weights small); ``"uniform"`` gives every unit ``1 / U``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["LassoInit", "UnitMixer", "lasso_penalty"]

LassoInit = Literal["last", "uniform"]


class UnitMixer(nn.Module):
    """``Σ_u α_u · unit_u`` then BN+ReLU; ``U`` units of ``(N, C, h, w)`` -> ``(N, C, h, w)``.

    Args:
        num_units: U, the number of units of the trunk's last block.
        channels: C, their channels.
        init: ``"last"`` (α = one-hot on the last unit) or ``"uniform"`` (α = 1/U).
    """

    def __init__(self, num_units: int, channels: int, init: LassoInit = "last") -> None:
        super().__init__()
        if num_units < 1:
            raise ValueError(f"UnitMixer: `num_units` must be >= 1, got {num_units}")
        if init == "last":
            alpha = torch.zeros(num_units)
            alpha[-1] = 1.0
        elif init == "uniform":
            alpha = torch.full((num_units,), 1.0 / num_units)
        else:
            raise ValueError(f"UnitMixer: `init` must be 'last' or 'uniform', got {init!r}")
        self.alpha = nn.Parameter(alpha)
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, units: list[Tensor]) -> Tensor:
        if len(units) != self.alpha.numel():
            raise ValueError(f"UnitMixer has {self.alpha.numel()} weights but got {len(units)} units")
        shapes = sorted({tuple(unit.shape) for unit in units})
        if len(shapes) > 1:  # e.g. slim's native stride: block 3's last unit has stride 2, the others not
            raise ValueError(
                f"UnitMixer: the units have different shapes {shapes}, and the lasso mixes units of one shape; "
                "use a trunk whose last block keeps one stride (ResNetV2 `output_stride: 16`; for a converted "
                "TF-slim checkpoint `mtssl convert-slim --output-stride 16`)"
            )
        mixed = units[0] * self.alpha[0].to(units[0].dtype)
        for weight, unit in zip(self.alpha[1:], units[1:]):  # over units (a few dozen), not samples
            mixed = mixed + weight.to(unit.dtype) * unit
        return self.relu(self.norm(mixed))

    def penalty(self) -> Tensor:
        """``Σ_u |α_u|`` (the L1 norm; its gradient is ``sign(α)``, 0 at 0)."""
        return lasso_penalty(self.alpha)


def lasso_penalty(alpha: Tensor) -> Tensor:
    """L1 norm ``Σ |α|`` of the mixing weights, a scalar."""
    return alpha.abs().sum()
