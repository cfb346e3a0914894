"""Lasso unit mixing (Doersch & Zisserman 2017, sec. 3.2): each task reads its own sparse linear
combination of the outputs of the units of the trunk's last block.

``mixed = ReLU( Σ_u α_u · norm_u(unit_u) )``, with one trainable ``α`` per task and an L1 penalty
``λ Σ_u |α_u|`` added to the task's loss so that ``α`` becomes sparse (a task picks the depths it
likes).

**Why each unit is normalised before the mix, and nothing after it.** The units are the raw
residual-stream outputs, whose scales differ by unit. A normalisation *after* the mix (the first
version here: ``BN(Σ_u α_u · unit_u)`` in training mode) makes the loss invariant to a positive
rescaling of ``α``: the L1 term then shrinks every ``α`` together until BatchNorm's ε matters, and
never trades one unit against another. Here each unit goes through its own BatchNorm without
affine parameters (batch statistics in training, running statistics in evaluation) *before* the
mix, so every unit enters on one scale, the mixed features grow with ``α`` and the loss depends on
its scale: the penalty competes with the loss, and a unit keeps its weight only as long as the
task's loss pays for it. (A head can still absorb a smaller ``α`` by growing its first layer,
which the optimizer does slowly; the selection happens long before that, see the tests.) With
``α`` one-hot on the last unit the mix is ``ReLU(BN(last unit))``, the naive representation
(``final_norm``) without BatchNorm's affine parameters. The paper does not detail its
normalisation; this is our choice.

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
    """``ReLU(Σ_u α_u · BN_u(unit_u))``; ``U`` units of ``(N, C, h, w)`` -> ``(N, C, h, w)``.

    ``BN_u`` is a BatchNorm without affine parameters per unit (one ``BatchNorm2d`` over the ``U·C``
    channels of the stacked units); see the module docstring for why.

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
        self.unit_norm = nn.BatchNorm2d(num_units * channels, affine=False)
        self.relu = nn.ReLU(inplace=True)

    def normalized_units(self, units: list[Tensor]) -> Tensor:
        """``(N, U, C, h, w)``: every unit normalised on its own (the mix's inputs)."""
        if len(units) != self.alpha.numel():
            raise ValueError(f"UnitMixer has {self.alpha.numel()} weights but got {len(units)} units")
        shapes = sorted({tuple(unit.shape) for unit in units})
        if len(shapes) > 1:  # e.g. slim's native stride: block 3's last unit has stride 2, the others not
            raise ValueError(
                f"UnitMixer: the units have different shapes {shapes}, and the lasso mixes units of one shape; "
                "use a trunk whose last block keeps one stride (ResNetV2 `output_stride: 16`; for a converted "
                "TF-slim checkpoint `mtssl convert-slim --output-stride 16`)"
            )
        n, c, h, w = units[0].shape
        return self.unit_norm(torch.cat(units, dim=1)).view(n, len(units), c, h, w)

    def forward(self, units: list[Tensor]) -> Tensor:
        normed = self.normalized_units(units)
        mixed = torch.einsum("u,nuchw->nchw", self.alpha.to(normed.dtype), normed)
        return self.relu(mixed)

    def penalty(self) -> Tensor:
        """``Σ_u |α_u|`` (the L1 norm; its gradient is ``sign(α)``, 0 at 0)."""
        return lasso_penalty(self.alpha)


def lasso_penalty(alpha: Tensor) -> Tensor:
    """L1 norm ``Σ |α|`` of the mixing weights, a scalar."""
    return alpha.abs().sum()
