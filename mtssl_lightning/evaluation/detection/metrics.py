"""The PASCAL VOC detection evaluation: matching, 11-point (VOC07) and area AP, mAP as a metric.

IoU ≥ 0.5, each detection assigned to its highest-IoU ground-truth box, greedy by score,
"difficult" boxes neither rewarded nor penalised, and the VOC2007 11-point interpolated AP that
VOC07 papers report. torchmetrics' ``MeanAveragePrecision`` (COCO-style, 101 points, no
difficult flag) is used beside it, after :func:`drop_difficult`; it has no VOC07 mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


@dataclass
class DetectionMatches:
    """VOC's assignment of detections to ground truth (see :func:`match_detections`).

    Attributes:
        true_positive: ``(D,)`` ``bool``: the detection is the highest-scoring one assigned to a
            non-difficult ground-truth box.
        ignored: ``(D,)`` ``bool``: assigned to a difficult box (VOC counts it neither way).
        gt_index: ``(D,)`` ``int64`` assigned ground-truth box (``-1``: IoU below threshold with all).
        iou: ``(D,)`` IoU with the best same-class ground-truth box of the image (0 if none).
    """

    true_positive: Tensor
    ignored: Tensor
    gt_index: Tensor
    iou: Tensor


def _pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of box pairs: ``a`` ``(..., 4)`` and ``b`` ``(..., 4)`` (broadcast) → ``(...)``."""
    # not torchvision.ops.box_iou: that is the full (N, M) matrix; here each detection meets only its K candidates
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def match_detections(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_images: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_difficult: Tensor,
    gt_images: Tensor,
    iou_threshold: float = 0.5,
) -> DetectionMatches:
    """The PASCAL VOC matching rule over a whole set of images at once.

    Each detection is assigned to the ground-truth box of its image and class with the largest
    IoU (difficult boxes included). If that IoU is ≥ ``iou_threshold``: a difficult box makes the
    detection *ignored*; otherwise it is a true positive if no higher-scoring detection was
    assigned to the same box (a duplicate is a false positive). Below the threshold: false
    positive. Because the assignment does not depend on the order, "greedy by score" reduces to
    "first in score order per box", computed without a loop.

    Args:
        det_boxes: ``(D, 4)`` ``(x1, y1, x2, y2)``; det_scores ``(D,)``; det_labels ``(D,)`` int;
            det_images ``(D,)`` int id of each detection's image.
        gt_boxes: ``(G, 4)``; gt_labels ``(G,)``; gt_difficult ``(G,)`` bool; gt_images ``(G,)``.
        iou_threshold: VOC's 0.5 (``>=``, as in the official MATLAB devkit).
    """
    device = det_boxes.device
    num_det, num_gt = det_boxes.shape[0], gt_boxes.shape[0]
    gt_index = torch.full((num_det,), -1, dtype=torch.int64, device=device)
    best_iou = torch.zeros(num_det, dtype=torch.float32, device=device)
    if num_det and num_gt:
        # one integer key per (image, class); group the ground truth by it
        _, image_ids = torch.unique(torch.cat([det_images, gt_images]), return_inverse=True)
        num_labels = int(torch.cat([det_labels, gt_labels]).max()) + 1
        det_key = image_ids[:num_det] * num_labels + det_labels
        gt_key = image_ids[num_det:] * num_labels + gt_labels
        gt_key_sorted, gt_order = torch.sort(gt_key, stable=True)
        start = torch.searchsorted(gt_key_sorted, det_key, right=False)
        count = torch.searchsorted(gt_key_sorted, det_key, right=True) - start
        width = int(count.max())
        if width > 0:
            slot = torch.arange(width, device=device)
            valid = slot[None, :] < count[:, None]  # (D, K): candidate k of detection d exists
            candidates = gt_order[(start[:, None] + slot[None, :]).clamp(max=num_gt - 1)]  # (D, K)
            iou = _pairwise_iou(det_boxes[:, None, :].float(), gt_boxes[candidates].float())
            iou = torch.where(valid, iou, torch.full_like(iou, -1.0))
            best_iou, best = iou.max(dim=1)  # ties: the first (lowest-index) ground-truth box, like the devkit
            has_gt = count > 0
            best_iou = torch.where(has_gt, best_iou, torch.zeros_like(best_iou))
            gt_index = torch.where(
                has_gt & (best_iou >= iou_threshold), candidates.gather(1, best[:, None])[:, 0], gt_index
            )
    assigned = gt_index >= 0
    safe_index = gt_index.clamp(min=0)
    ignored = assigned & gt_difficult.to(torch.bool)[safe_index] if num_gt else torch.zeros_like(assigned)
    candidate = assigned & ~ignored
    # rank in descending score order (stable: ties keep input order, like the devkit's sort)
    rank = torch.empty(num_det, dtype=torch.int64, device=device)
    rank[torch.argsort(det_scores, descending=True, stable=True)] = torch.arange(num_det, device=device)
    first = torch.full((max(num_gt, 1),), num_det, dtype=torch.int64, device=device)
    first = first.scatter_reduce(0, safe_index[candidate], rank[candidate], reduce="amin")
    true_positive = candidate & (rank == first[safe_index])
    return DetectionMatches(true_positive=true_positive, ignored=ignored, gt_index=gt_index, iou=best_iou)


def voc07_ap(recall: Tensor, precision: Tensor) -> Tensor:
    """VOC2007's 11-point interpolated average precision.

    ``AP = (1/11) Σ_{t ∈ {0, 0.1, …, 1}} max{precision_i : recall_i ≥ t}`` (0 where no point
    reaches ``t``), with ``recall``/``precision`` ``(D,)`` the values after each detection in
    descending score order. Returns a scalar tensor.
    """
    thresholds = torch.linspace(0.0, 1.0, 11, dtype=torch.float64, device=recall.device)
    if recall.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=recall.device)
    reached = recall.double()[None, :] >= thresholds[:, None] - 1e-12  # (11, D); tolerance for 0.1*k rounding
    best = torch.where(reached, precision.double()[None, :], torch.zeros((), dtype=torch.float64, device=recall.device))
    return best.max(dim=1).values.mean()


def voc_ap(recall: Tensor, precision: Tensor) -> Tensor:
    """VOC2010+ average precision: the area under the monotone (interpolated) precision-recall curve."""
    if recall.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=recall.device)
    zero, one = recall.new_zeros(1, dtype=torch.float64), recall.new_ones(1, dtype=torch.float64)
    mrec = torch.cat([zero, recall.double(), one])
    mpre = torch.cat([zero, precision.double(), zero])
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])  # precision envelope
    return ((mrec[1:] - mrec[:-1]) * mpre[1:]).sum()


@dataclass
class VOCResult:
    """Output of :func:`voc_map`.

    Attributes:
        map: scalar mean of ``ap`` (NaN when no class has a non-difficult ground-truth box).
        ap: ``(K,)`` float64 AP of each class in ``classes``.
        classes: ``(K,)`` labels that have at least one non-difficult ground-truth box.
    """

    map: Tensor
    ap: Tensor
    classes: Tensor


def voc_map(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_images: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_difficult: Tensor,
    gt_images: Tensor,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> VOCResult:
    """PASCAL VOC mean average precision of detections over a set of images.

    Matching as in :func:`match_detections`; per class, detections of all images sorted by
    score, ignored ones dropped, recall = TP / (non-difficult ground-truth boxes), precision =
    TP / (TP + FP), AP by :func:`voc07_ap` (``use_07_metric``, what VOC2007 papers report) or
    :func:`voc_ap`. Classes with no non-difficult ground truth are left out of the mean.
    Shapes as in :func:`match_detections`.
    """
    matches = match_detections(
        det_boxes, det_scores, det_labels, det_images, gt_boxes, gt_labels, gt_difficult, gt_images, iou_threshold
    )
    counted_gt = ~gt_difficult.to(torch.bool)
    classes = torch.unique(gt_labels[counted_gt])
    ap_of = voc07_ap if use_07_metric else voc_ap
    order = torch.argsort(det_scores, descending=True, stable=True)
    kept = order[~matches.ignored[order]]  # detections that count, in score order
    aps = []
    for label in classes.tolist():  # ≤ 20 classes; the matching above is the batched part
        in_class = kept[det_labels[kept] == label]
        tp = matches.true_positive[in_class].double().cumsum(0)
        fp = (~matches.true_positive[in_class]).double().cumsum(0)
        num_pos = (counted_gt & (gt_labels == label)).sum().double()
        aps.append(ap_of(tp / num_pos, tp / (tp + fp).clamp(min=1e-12)))
    ap = torch.stack(aps) if aps else torch.zeros(0, dtype=torch.float64, device=det_boxes.device)
    mean = ap.mean() if aps else torch.tensor(float("nan"), dtype=torch.float64, device=det_boxes.device)
    return VOCResult(map=mean, ap=ap, classes=classes)


def _flatten(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], image_ids: Tensor) -> tuple[Tensor, ...]:
    """Concatenate per-image predictions/targets into the flat tensors of :func:`match_detections`."""
    device = image_ids.device
    det_counts = torch.tensor([len(p["scores"]) for p in preds], device=device)
    gt_counts = torch.tensor([len(t["labels"]) for t in targets], device=device)
    det_boxes = torch.cat([p["boxes"].reshape(-1, 4) for p in preds]).float()
    gt_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).float()
    difficult = [t.get("difficult", torch.zeros_like(t["labels"], dtype=torch.bool)) for t in targets]
    return (
        det_boxes,
        torch.cat([p["scores"] for p in preds]).float(),
        torch.cat([p["labels"] for p in preds]).long(),
        image_ids.repeat_interleave(det_counts),
        gt_boxes,
        torch.cat([t["labels"] for t in targets]).long(),
        torch.cat(difficult).to(torch.bool),
        image_ids.repeat_interleave(gt_counts),
    )


#: VOCMeanAP's list states, in the order of :func:`_flatten` and :func:`voc_map`: empty shape and dtype of each
_FLAT_STATES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "det_boxes": ((0, 4), torch.float32),
    "det_scores": ((0,), torch.float32),
    "det_labels": ((0,), torch.int64),
    "det_images": ((0,), torch.int64),
    "gt_boxes": ((0, 4), torch.float32),
    "gt_labels": ((0,), torch.int64),
    "gt_difficult": ((0,), torch.bool),
    "gt_images": ((0,), torch.int64),
}


class VOCMeanAP(Metric):
    """Accumulates detections and ground truth over batches and computes :func:`voc_map`.

    ``update(preds, targets)`` takes torchvision's detection format: ``preds[i]`` a dict with
    ``boxes (N_i, 4)``, ``scores (N_i,)``, ``labels (N_i,)``; ``targets[i]`` with ``boxes``,
    ``labels`` and optionally ``difficult (M_i,)`` bool. ``compute()`` returns a :class:`VOCResult`.
    Under DDP every rank's images are kept apart (a padded duplicate counts twice, as in torchmetrics).
    """

    full_state_update = False

    def __init__(self, iou_threshold: float = 0.5, use_07_metric: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold, self.use_07_metric = iou_threshold, use_07_metric
        for name in _FLAT_STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("num_images", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
        if not preds:
            return
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = self.num_images + torch.arange(len(preds), device=self.device)
        image_ids = local * world + rank  # unique across ranks
        self.num_images += len(preds)
        flat = _flatten(preds, targets, image_ids)
        for name, value in zip(_FLAT_STATES, flat):
            getattr(self, name).append(value)

    def compute(self) -> VOCResult:
        def cat(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                return torch.zeros(shape, dtype=dtype, device=self.device)
            return dim_zero_cat(value)

        flat = (cat(name, shape, dtype) for name, (shape, dtype) in _FLAT_STATES.items())
        return voc_map(*flat, iou_threshold=self.iou_threshold, use_07_metric=self.use_07_metric)


def drop_difficult(
    preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], iou_threshold: float = 0.5
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """VOC's difficult rule made explicit, for a COCO-style evaluator that has none.

    Removes the detections VOC would ignore (assigned to a difficult box, see
    :func:`match_detections`) and the difficult boxes themselves. What remains is scored by
    COCO-style matching (a detection may take its best *unmatched* box), which can differ from
    VOC's on crowded duplicates; :func:`voc_map` is the exact VOC metric.
    """
    if not preds:
        return preds, targets
    device = preds[0]["boxes"].device
    image_ids = torch.arange(len(preds), device=device)
    flat = _flatten(preds, targets, image_ids)
    ignored = match_detections(*flat, iou_threshold=iou_threshold).ignored
    keep_det = (~ignored).split([len(p["scores"]) for p in preds])
    new_preds = [{k: v[keep] for k, v in p.items()} for p, keep in zip(preds, keep_det)]
    new_targets = []
    for t in targets:
        keep = ~t["difficult"].to(torch.bool) if "difficult" in t else torch.ones_like(t["labels"], dtype=torch.bool)
        new_targets.append({k: v[keep] for k, v in t.items() if k != "difficult"})
    return new_preds, new_targets
