"""Metric building blocks shared by the tasks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["HitRate"]


class HitRate(Metric):
    """Share of hits among counted items, summed over updates and processes (float64 counts).

    Subclasses decide in ``update`` what a hit is and pass a boolean tensor to :meth:`count`;
    ``compute() = hits / total`` (0 before any item is counted).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def count(self, hits: Tensor) -> None:
        """Add a boolean tensor of per-item hits (any shape)."""
        self.hits += hits.sum().to(torch.float64)
        self.total += float(hits.numel())

    def compute(self) -> Tensor:
        return (self.hits / self.total.clamp_min(1.0)).to(torch.float32)
