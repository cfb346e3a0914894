"""The heads' bilinear resize (matrix products, deterministic backward on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtssl_lightning.tasks.heads import resize_bilinear


def test_resize_bilinear_matches_interpolate():
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    for size in [(14, 10), (28, 9), (3, 2)]:
        torch.testing.assert_close(resize_bilinear(x, size), F.interpolate(x, size, mode="bilinear", align_corners=False))


def test_resize_first_used_under_inference_mode_still_trains():
    """``trainer.validate`` before ``fit`` (one process) first builds the cached matrices under
    inference mode; a training step must still be able to save them for its backward."""
    with torch.inference_mode():
        resize_bilinear(torch.randn(1, 2, 6, 11), (37, 41))  # sizes used nowhere else: a fresh cache entry
    x = torch.randn(1, 2, 6, 11, requires_grad=True)
    resize_bilinear(x, (37, 41)).sum().backward()
    # each output sums the inputs with weights summing to 1: the gradient of the sum is the
    # number of outputs each input reaches, weighted — in all, as many as there are outputs
    torch.testing.assert_close(x.grad.sum(), torch.tensor(2 * 37 * 41.0))
