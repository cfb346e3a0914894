"""The VOC/COCO detection metrics by hand, and against the VOC devkit's loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from mtssl_lightning.evaluation.detection.metrics import (
    VOCMeanAP,
    drop_difficult,
    match_detections,
    voc07_ap,
    voc_ap,
    voc_map,
)

A, B, C = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0]


def coco_map50(preds, targets) -> float:
    metric = MeanAveragePrecision(iou_thresholds=[0.5], backend="pycocotools")
    metric.update(*drop_difficult(preds, targets))
    return metric.compute()["map"].item()


def voc07_map50(preds, targets) -> float:
    metric = VOCMeanAP()
    metric.update(preds, targets)
    return metric.compute().map.item()


def test_perfect_predictions_score_one():
    targets = [
        {"boxes": torch.tensor([A, B]), "labels": torch.tensor([3, 7]), "difficult": torch.tensor([False, True])},
        {"boxes": torch.tensor([C, A]), "labels": torch.tensor([7, 12]), "difficult": torch.tensor([False, False])},
    ]
    # every box found exactly, even the difficult one (which VOC neither rewards nor penalises)
    preds = [
        {"boxes": t["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]), "labels": t["labels"].clone()}
        for t in targets
    ]
    assert coco_map50(preds, targets) == pytest.approx(1.0)
    assert voc07_map50(preds, targets) == pytest.approx(1.0)
    assert voc07_ap(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(1.0)


def test_hand_computed_ap_with_a_false_positive_ranked_between():
    # One class, ground truth A and B; detections by score: A (0.9, TP), C (0.8, FP: no overlap), B (0.7, TP).
    # After each detection: recall 1/2, 1/2, 2/2; precision 1/1, 1/2, 2/3.
    # VOC07 11-point: t = 0, .1, ..., .5 (6 points): max precision at recall >= t is 1;
    #   t = .6, ..., 1 (5 points): only the 3rd detection reaches it, 2/3.  AP = (6 + 5 * 2/3) / 11 = 28/33.
    # COCO 101-point: precision made monotone from the right: 1, 2/3, 2/3; recall thresholds 0, .01, ..., 1:
    #   r <= .5 (51 points) -> 1; r in (.5, 1] (50 points) -> 2/3.  AP = (51 + 50 * 2/3) / 101 = 253/303.
    # VOC2010+ area: 1/2 * 1 + 1/2 * 2/3 = 5/6.
    preds = [
        {"boxes": torch.tensor([A, C, B]), "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([5, 5, 5])}
    ]
    targets = [
        {"boxes": torch.tensor([A, B]), "labels": torch.tensor([5, 5]), "difficult": torch.tensor([False, False])}
    ]
    assert voc07_map50(preds, targets) == pytest.approx(28 / 33)
    assert coco_map50(preds, targets) == pytest.approx(253 / 303, abs=1e-6)
    recall, precision = torch.tensor([0.5, 0.5, 1.0]), torch.tensor([1.0, 0.5, 2 / 3])
    assert voc07_ap(recall, precision).item() == pytest.approx(28 / 33)
    assert voc_ap(recall, precision).item() == pytest.approx(5 / 6)


def test_difficult_and_duplicate_detections():
    # A (difficult) and B; detections: on A (0.95: ignored, neither TP nor FP), B (0.9: TP), B again (0.8: duplicate -> FP).
    # Counted: TP, FP with one positive -> recall 1, 1; precision 1, 1/2 -> AP 1 for both metrics.
    targets = [
        {"boxes": torch.tensor([A, B]), "labels": torch.tensor([2, 2]), "difficult": torch.tensor([True, False])}
    ]
    preds = [
        {"boxes": torch.tensor([A, B, B]), "scores": torch.tensor([0.95, 0.9, 0.8]), "labels": torch.tensor([2, 2, 2])}
    ]
    assert voc07_map50(preds, targets) == pytest.approx(1.0)
    assert coco_map50(preds, targets) == pytest.approx(1.0)
    # A not difficult: the detection on A is now a TP: recall 1/2, 1, 1; precision 1, 1, 2/3 -> AP still 1
    targets[0]["difficult"] = torch.tensor([False, False])
    assert voc07_map50(preds, targets) == pytest.approx(1.0)
    # a box with IoU exactly 1/2 (half of A) matches (VOC devkit: >= 0.5); one just below does not
    half = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.9]])
    m = match_detections(
        half,
        torch.tensor([0.9, 0.8]),
        torch.tensor([1, 1]),
        torch.tensor([0, 1]),
        torch.tensor([A, A]),
        torch.tensor([1, 1]),
        torch.tensor([False, False]),
        torch.tensor([0, 1]),
    )
    assert m.true_positive.tolist() == [True, False] and m.gt_index.tolist() == [0, -1]


def reference_voc07_map(dets, gts, use_07=True):
    """The VOC devkit's per-class loop (voc_eval.py), written out plainly: an independent check."""
    aps = []
    for label in sorted({g[1] for g in gts if not g[3]}):
        class_gts = [g for g in gts if g[1] == label]
        npos = sum(not g[3] for g in class_gts)
        used = set()
        class_dets = sorted([d for d in dets if d[1] == label], key=lambda d: -d[2])
        tp, fp = [], []
        for image, _, _, box in class_dets:
            best, best_j = -1.0, None
            for j, g in enumerate(class_gts):
                if g[0] != image:
                    continue
                ix = max(0.0, min(box[2], g[2][2]) - max(box[0], g[2][0]))
                iy = max(0.0, min(box[3], g[2][3]) - max(box[1], g[2][1]))
                inter = ix * iy
                union = (box[2] - box[0]) * (box[3] - box[1]) + (g[2][2] - g[2][0]) * (g[2][3] - g[2][1]) - inter
                if inter / union > best:
                    best, best_j = inter / union, j
            if best >= 0.5:
                if class_gts[best_j][3]:
                    continue  # difficult: ignored
                if best_j not in used:
                    used.add(best_j)
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, 1e-12)
        ap = 0.0
        for t in np.linspace(0, 1, 11):
            ap += (prec[rec >= t - 1e-12].max() if (rec >= t - 1e-12).any() else 0.0) / 11
        aps.append(ap)
    return float(np.mean(aps))


def test_voc_map_agrees_with_the_devkit_loop():
    g = torch.Generator().manual_seed(0)
    num_images, num_gt, num_det = 6, 30, 120
    gt_xy = torch.rand(num_gt, 2, generator=g) * 60
    gt_boxes = torch.cat([gt_xy, gt_xy + 10 + torch.rand(num_gt, 2, generator=g) * 30], 1)
    gt_labels = torch.randint(1, 4, (num_gt,), generator=g)
    gt_images = torch.randint(0, num_images, (num_gt,), generator=g)
    gt_difficult = torch.rand(num_gt, generator=g) < 0.2
    src = torch.randint(0, num_gt, (num_det,), generator=g)  # detections jittered around ground truth, some far off
    det_boxes = gt_boxes[src] + torch.randn(num_det, 4, generator=g) * 4
    det_boxes[:, 2:] = torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
    det_labels = torch.where(
        torch.rand(num_det, generator=g) < 0.8, gt_labels[src], torch.randint(1, 4, (num_det,), generator=g)
    )
    det_images = torch.where(
        torch.rand(num_det, generator=g) < 0.9, gt_images[src], torch.randint(0, num_images, (num_det,), generator=g)
    )
    det_scores = torch.rand(num_det, generator=g)
    result = voc_map(det_boxes, det_scores, det_labels, det_images, gt_boxes, gt_labels, gt_difficult, gt_images)
    dets = [(int(i), int(c), float(s), b.tolist()) for i, c, s, b in zip(det_images, det_labels, det_scores, det_boxes)]
    gts = [(int(i), int(c), b.tolist(), bool(d)) for i, c, b, d in zip(gt_images, gt_labels, gt_boxes, gt_difficult)]
    expected = reference_voc07_map(dets, gts)
    assert 0.2 < expected < 0.95  # a non-trivial case
    assert result.map.item() == pytest.approx(expected, abs=1e-9)
