"""Metric building blocks shared by the tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

__all__ = ["HitRate"]


class HitRate(MeanMetric):
    """Share of hits among counted items, over updates and processes: torchmetrics' ``MeanMetric`` of
    the per-item hit flags, kept in float64 (exact counts beyond 2^24 items, e.g. pixels).

    Subclasses decide in ``update`` what a hit is and pass a boolean tensor to :meth:`count`;
    ``compute() = hits / total`` as float32 (0 before any item is counted). NaN checks are off:
    hit flags are never NaN, and the check would cost a host sync on every update.
    """

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)
        self.set_dtype(torch.float64)

    def count(self, hits: Tensor) -> None:
        """Add a boolean tensor of per-item hits (any shape)."""
        MeanMetric.update(self, hits.reshape(-1))

    @property
    def hits(self) -> Tensor:
        """Hits counted so far (float64; ``MeanMetric``'s weighted sum)."""
        return self.mean_value

    @property
    def total(self) -> Tensor:
        """Items counted so far (float64; ``MeanMetric``'s total weight)."""
        return self.weight

    def compute(self) -> Tensor:
        return (self.mean_value / self.weight.clamp_min(1.0)).to(torch.float32)
