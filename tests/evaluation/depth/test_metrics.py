"""The NYU depth metrics by hand: perfect and imperfect predictions, invalid pixels, pooling over the set."""

from __future__ import annotations

import math

import torch

from mtssl_lightning.evaluation.depth.metrics import DepthMetrics


def test_metrics_perfect_imperfect_and_invalid_pixels():
    truth = torch.tensor([[1.0, 2.0], [4.0, 5.0]]).view(1, 1, 2, 2)
    all_valid = torch.ones_like(truth, dtype=torch.bool)
    perfect = DepthMetrics()
    perfect.update(truth.clone(), truth, all_valid)
    out = perfect.compute()
    assert out["delta1"] == 1 and out["abs_rel"] == 0 and out["rmse"] == 0 and out["log10"] == 0

    metrics = DepthMetrics()
    pred = truth.clone()
    pred[0, 0, 0] *= 1.3  # half the pixels 30 % too far: 1.3 and 2.6 for 1 and 2
    invalid_pred = torch.cat([pred, torch.full((1, 1, 1, 2), 100.0)], dim=2)  # a third row, invalid
    invalid_truth = torch.cat([truth, torch.full((1, 1, 1, 2), 1.0)], dim=2)
    valid = torch.cat([all_valid, torch.zeros(1, 1, 1, 2, dtype=torch.bool)], dim=2)
    metrics.update(invalid_pred, invalid_truth, valid)
    out = metrics.compute()
    assert math.isclose(out["delta1"].item(), 0.5)  # 1.3 > 1.25
    assert math.isclose(out["delta2"].item(), 1.0) and math.isclose(out["delta3"].item(), 1.0)  # 1.3 < 1.5625
    assert math.isclose(out["abs_rel"].item(), 0.15, rel_tol=1e-6)  # (0.3 + 0.3 + 0 + 0) / 4
    assert math.isclose(out["rmse"].item(), math.sqrt((0.3**2 + 0.6**2) / 4), rel_tol=1e-6)
    assert math.isclose(out["log10"].item(), 2 * math.log10(1.3) / 4, rel_tol=1e-6)


def test_metrics_pool_pixels_over_the_whole_set():
    """RMSE is one root over all pixels, not a mean of per-image RMSEs."""
    metrics = DepthMetrics()
    a = torch.full((1, 1, 1, 1), 2.0)
    metrics.update(a + 1.0, a, torch.ones_like(a, dtype=torch.bool))  # one pixel, error 1
    b = torch.full((1, 1, 1, 3), 2.0)
    metrics.update(b, b, torch.ones_like(b, dtype=torch.bool))  # three perfect pixels
    out = metrics.compute()
    assert math.isclose(out["rmse"].item(), math.sqrt(1 / 4), rel_tol=1e-6)  # per-image mean would be 0.5
    assert math.isclose(out["delta1"].item(), 3 / 4)
