"""The standard NYU depth metrics (δ thresholds, abs-rel, RMSE, log10), pooled over every valid pixel.

Not torchmetrics' regression metrics: they have no δ-thresholds and take no mask of valid pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

MIN_DEPTH = 1e-3  # metres added to the softplus: a prediction is never 0 (δ and abs-rel stay finite)


class DepthMetrics(Metric):
    """The standard NYU depth metrics, pooled pixel-wise over every valid pixel of every image.

    Sums over all valid pixels of the whole set (float64, summed across processes), then:

    * ``delta1``, ``delta2``, ``delta3``: **fraction** (0–1, not percent) of pixels with
      ``max(d / d*, d* / d) < 1.25``, ``1.25²``, ``1.25³``;
    * ``abs_rel``: mean of ``|d - d*| / d*``;
    * ``rmse``: ``sqrt`` of the mean of ``(d - d*)²`` (metres), one root over the whole set;
    * ``log10``: mean of ``|log10 d - log10 d*|``.

    Every pixel weighs the same, so images with more valid pixels weigh more (some papers
    instead average per-image RMSEs; the numbers differ slightly). ``update(pred, target,
    valid)`` takes ``(B, 1, H, W)`` metres and bool; ``compute()`` returns a dict of scalars.
    """

    full_state_update = False
    NAMES = ("delta1", "delta2", "delta3", "abs_rel", "rmse", "log10")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("count", "delta1", "delta2", "delta3", "abs_rel", "squared", "log10"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, valid: Tensor) -> None:
        if pred.shape != target.shape or valid.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and valid {tuple(valid.shape)} must match")
        valid = valid & (target > 0)
        d = pred.detach()[valid].to(torch.float64).clamp_min(MIN_DEPTH)
        t = target[valid].to(torch.float64)
        ratio = torch.maximum(d / t, t / d)
        self.count += t.numel()
        self.delta1 += (ratio < 1.25).sum()
        self.delta2 += (ratio < 1.25**2).sum()
        self.delta3 += (ratio < 1.25**3).sum()
        self.abs_rel += ((d - t).abs() / t).sum()
        self.squared += (d - t).square().sum()
        self.log10 += (torch.log10(d) - torch.log10(t)).abs().sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1.0)
        values = {
            "delta1": self.delta1 / n,
            "delta2": self.delta2 / n,
            "delta3": self.delta3 / n,
            "abs_rel": self.abs_rel / n,
            "rmse": (self.squared / n).sqrt(),
            "log10": self.log10 / n,
        }
        return {k: v.to(torch.float32) for k, v in values.items()}
