"""Faster R-CNN with the pretrained trunk: block 3 as backbone, a fresh block 4 per RoI.

The paper's detection protocol (Doersch & Zisserman 2017, following He et al.'s ResNet
Faster R-CNN): the pretrained trunk up to block 3 computes one stride-16 feature map for the
whole image; the RPN proposes boxes on it; every proposal is RoI-aligned to 14×14, runs through a
freshly initialised block 4 (stride 2 → 7×7), is average-pooled and classified/regressed by a
linear predictor. The whole network is fine-tuned (``frozen: false``); ``frozen: true`` keeps the
trunk's weights and BN statistics fixed and trains only the RPN, block 4 and the predictor.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from mtssl_lightning.evaluation.backbone import SavesTrunkSpec, TrunkRepresentation, pretrained_trunk
from mtssl_lightning.evaluation.detection.data import VOCBatch
from mtssl_lightning.evaluation.detection.metrics import VOCMeanAP, drop_difficult
from mtssl_lightning.evaluation.detection.voc import VOC_CLASSES
from mtssl_lightning.tasks.heads import GlobalAvgPool
from mtssl_lightning.trunks.base import Trunk


class Float32BoxCoding:
    """Box encoding and decoding in float32 whatever the autocast state, around torchvision's coder.

    torchvision's ``BoxCoder`` casts the anchors (proposals) to the dtype of the regression
    output: under ``bf16-mixed`` that is bfloat16, whose 8-bit mantissa puts a box corner at 600 px
    ±2 px, before any learning. This wrapper hands it float32 tensors with autocast off, so only
    the network runs in bf16. It replaces the ``box_coder`` attribute of torchvision's RPN and RoI
    heads (what they call: ``encode``, ``decode``, ``weights``, ``bbox_xform_clip``; a test checks
    that torchvision still has and uses them).
    """

    def __init__(self, coder: Any) -> None:
        self.coder = coder
        self.weights, self.bbox_xform_clip = coder.weights, coder.bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, ...]:
        with torch.autocast(device_type=proposals[0].device.type, enabled=False):
            return self.coder.encode([b.float() for b in reference_boxes], [p.float() for p in proposals])

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        with torch.autocast(device_type=rel_codes.device.type, enabled=False):
            return self.coder.decode(rel_codes.float(), [b.float() for b in boxes])


def _block4_head(trunk: Trunk) -> nn.Sequential:
    """Fresh block 4 (stride 2: 14×14 RoIs → 7×7) then global average pooling → ``(R, C4)``."""
    next_block = getattr(trunk, "next_block", None)
    if next_block is None:
        raise ValueError(
            f"the per-RoI head is the trunk's block 4 (`next_block`), which {type(trunk).__name__} does not "
            "provide; use a ResNetV2 trunk (mtssl_lightning.trunks.ResNetV2) cut after block 3"
        )
    block = next_block(stride=2)
    head = nn.Sequential(block, GlobalAvgPool())  # a mean: deterministic backward on CUDA
    head.out_channels = block.out_channels  # type: ignore[assignment]
    return head


class FasterRCNNDetector(SavesTrunkSpec, pl.LightningModule):
    """Faster R-CNN on the pretrained trunk: block 3 as backbone, a fresh block 4 as per-RoI head.

    Args:
        checkpoint: ``mtssl fit`` checkpoint or trunk export whose trunk to transfer (``None``:
            ``trunk`` as initialised, the random-init baseline).
        trunk: the trunk used when ``checkpoint`` is ``None`` (a ResNetV2 cut after block 3).
        frozen: keep the trunk fixed (weights and BN statistics); otherwise fine-tune it.
        num_classes: classes including background (VOC: 20 + 1).
        min_size, max_size: image resizing of torchvision's ``GeneralizedRCNNTransform``; keep
            them equal to the DataModule's ``image_size``/``max_size`` (then it resizes nothing).
        anchor_sizes, aspect_ratios: RPN anchors on the single stride-16 feature map (every
            size with every ratio).
        roi_size: RoIAlign output (14, so block 4's stride 2 gives 7×7, as in ResNet Faster R-CNN).
        rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test, rpn_batch_size_per_image, box_batch_size_per_image,
        box_score_thresh, box_nms_thresh, box_detections_per_img: torchvision's
            ``FasterRCNN`` arguments of the same names.
        train_difficult: train on boxes marked difficult too (py-faster-rcnn's default: no).
        optimizer: builds the optimizer from the trainable parameters (default SGD, lr 0.005,
            momentum 0.9, weight decay 1e-4).
        lr_scheduler: optional, stepped every training step.
        warmup_steps: linear learning-rate warm-up from 0.001× over this many steps (0: none),
            applied on top of ``lr_scheduler``.

    Training logs ``train/loss`` (the sum) and each torchvision loss (``train/loss_classifier``,
    ``train/loss_box_reg``, ``train/loss_objectness``, ``train/loss_rpn_box_reg``); evaluation
    logs ``{val,test}/mAP50`` (torchmetrics, COCO-style 101-point AP at IoU 0.5 after VOC's
    difficult rule) and ``{val,test}/mAP50_voc07`` (VOC07 11-point AP), plus per-class
    ``test/AP50_voc07/<class>``.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        trunk: Trunk | None = None,
        frozen: bool = False,
        num_classes: int = 21,
        min_size: int = 600,
        max_size: int = 1000,
        anchor_sizes: list[int] | None = None,
        aspect_ratios: list[float] | None = None,
        roi_size: int = 14,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        train_difficult: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["trunk", "optimizer", "lr_scheduler"])
        if num_classes < 2:
            raise ValueError(f"`num_classes` counts the background too and must be >= 2, got {num_classes}")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        anchor_sizes = [32, 64, 128, 256, 512] if anchor_sizes is None else list(anchor_sizes)
        aspect_ratios = [0.5, 1.0, 2.0] if aspect_ratios is None else list(aspect_ratios)
        trunk = pretrained_trunk(checkpoint, trunk)
        box_head = _block4_head(trunk)  # built from the trunk's spec before freezing (fresh weights either way)
        backbone = TrunkRepresentation(
            trunk, frozen=frozen
        )  # has .out_channels; FasterRCNN wraps its tensor as {"0": …}
        predictor = FastRCNNPredictor(box_head.out_channels, num_classes)
        # py-faster-rcnn's initialisation of the final layers
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)
        self.model = FasterRCNN(
            backbone,
            num_classes=None,
            min_size=min_size,
            max_size=max_size,
            image_mean=[0.0, 0.0, 0.0],  # the trunk normalises its [0, 1] input itself
            image_std=[1.0, 1.0, 1.0],
            rpn_anchor_generator=AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),)),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=roi_size, sampling_ratio=2),
            box_head=box_head,
            box_predictor=predictor,
            box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_batch_size_per_image=box_batch_size_per_image,
        )
        # anchors and proposals stay float32 under bf16-mixed (see Float32BoxCoding)
        self.model.rpn.box_coder = Float32BoxCoding(self.model.rpn.box_coder)
        self.model.roi_heads.box_coder = Float32BoxCoding(self.model.roi_heads.box_coder)
        self.frozen, self.train_difficult = frozen, train_difficult
        self.optimizer_factory, self.scheduler_factory, self.warmup_steps = optimizer, lr_scheduler, warmup_steps
        self.map_coco = MeanAveragePrecision(
            iou_type="bbox", box_format="xyxy", iou_thresholds=[0.5], backend="pycocotools"
        )
        self.map_voc = VOCMeanAP(iou_threshold=0.5, use_07_metric=True)
        self._skipped_files = 0

    @property
    def trunk(self) -> Trunk:
        """The transferred trunk (inside the detector's backbone)."""
        return self.model.backbone.trunk

    @staticmethod
    def _images(batch: VOCBatch) -> list[Tensor]:
        return [image.float().div_(255.0) for image in batch.images]

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of ``images`` (each ``(3, H_i, W_i)`` float in [0, 1]), in eval mode.

        Returns per image ``{"boxes": (N, 4) xyxy pixels, "labels": (N,), "scores": (N,)}``.
        """
        return self.model(images)

    def training_step(self, batch: VOCBatch, batch_idx: int) -> Tensor | None:
        self._skipped_files += batch.skipped
        if batch.skipped:
            self.log("train/skipped_files", float(self._skipped_files), on_step=True, on_epoch=False, batch_size=1)
        if len(batch) == 0:
            return None  # every image of the batch was undecodable: skip the step
        targets = []
        for boxes, labels, difficult in zip(batch.boxes, batch.labels, batch.difficult):
            keep = torch.ones_like(difficult) if self.train_difficult else ~difficult
            targets.append({"boxes": boxes[keep], "labels": labels[keep]})
        losses = self.model(self._images(batch), targets)
        loss = sum(losses.values())
        n = len(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    # ----------------------------------------------------------------------- evaluation
    def _reset_metrics(self) -> None:
        self.map_coco.reset()
        self.map_voc.reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    def _eval_step(self, batch: VOCBatch) -> None:
        if len(batch) == 0:
            return
        preds = self.model(self._images(batch))
        targets = [
            {"boxes": b, "labels": lab, "difficult": d} for b, lab, d in zip(batch.boxes, batch.labels, batch.difficult)
        ]
        self.map_voc.update(preds, targets)
        self.map_coco.update(*drop_difficult(preds, targets))

    def validation_step(self, batch: VOCBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: VOCBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def _log_metrics(self, stage: str) -> None:
        coco = self.map_coco.compute()
        voc = self.map_voc.compute()
        # sync_dist=False: both metrics already gathered every rank's images
        self.log(f"{stage}/mAP50", coco["map"].float(), prog_bar=True)
        self.log(f"{stage}/mAP50_voc07", voc.map.float(), prog_bar=True)
        if stage == "test":
            # torchmetrics squeezes one-element results to scalars; reshape(-1) undoes that
            for label, ap in zip(voc.classes.reshape(-1).tolist(), voc.ap.reshape(-1)):
                if 1 <= label <= len(VOC_CLASSES) and self.hparams.num_classes == len(VOC_CLASSES) + 1:
                    self.log(f"test/AP50_voc07/{VOC_CLASSES[label - 1]}", ap.float())
        self._reset_metrics()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ----------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # a frozen trunk contributes none
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4)
        else:
            optimizer = self.optimizer_factory(params)
        schedulers = []
        if self.scheduler_factory is not None:
            schedulers.append(self.scheduler_factory(optimizer))
        if self.warmup_steps > 0:
            # chainable: multiplies whatever the user's schedule sets, for the first warmup_steps
            schedulers.append(torch.optim.lr_scheduler.LinearLR(optimizer, 0.001, 1.0, total_iters=self.warmup_steps))
        if not schedulers:
            return optimizer
        scheduler = (
            schedulers[0] if len(schedulers) == 1 else torch.optim.lr_scheduler.ChainedScheduler(schedulers, optimizer)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
