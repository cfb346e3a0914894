"""Motion segmentation (Pathak, Girshick, Dollár, Darrell, Hariharan 2017) as a self-supervised task.

From a single frame, predict which of its pixels move independently of the camera. The
targets come from the frame's video: the DataModule delivers short clips (``clip_length``
frames, ``frame_stride`` apart); the key frame ``T // 2`` is the trunk's only input and its
motion mask is the target, computed on the device from the whole clip by
:func:`~mtssl_lightning.data.motion.motion_masks` or read from precomputed masks shipped with
the frames (uNLC, optical flow… see :class:`~mtssl_lightning.data.frames.FrameFolder`). A dense
head (:class:`~mtssl_lightning.tasks.heads.DenseHead`) predicts one logit per pixel at
1/``output_stride`` of the input; the loss is the per-pixel sigmoid cross-entropy with a
positive-class weight; metrics are the IoU and the F-measure of the thresholded prediction
(0.5) against the targets, accumulated over the epoch (pixel counts, not per-image means).

Deviations / assumptions (all config options): the masks are our device-side method, not uNLC
(see :mod:`mtssl_lightning.data.motion`); by default the positive-class weight balances each
batch (``#negative / #positive`` target pixels, clamped to [1, 100]) because moving pixels are
rare; a fixed ``pos_weight`` can be set instead.

Loss and metric updates make the host wait for nothing (no value read back, no tensor built from
Python data), so a training step on a GPU is never stalled by this task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch, TaskBatch
from mtssl_lightning.data.motion import MotionMaskConfig, motion_masks
from mtssl_lightning.tasks import pictures as draw
from mtssl_lightning.tasks.base import InputMode, Task, TaskSampler
from mtssl_lightning.tasks.heads import DenseHead

__all__ = ["MotionSegmentation", "MotionSegmentationBatch", "MotionSegmentationSampler", "MovingFMeasure", "MovingIoU"]

MaskSource = Literal["auto", "compute", "precomputed"]


@dataclass
class MotionSegmentationBatch(TaskBatch):
    """Inputs and targets of the motion-segmentation task.

    Attributes:
        inputs: ``(B, 3, H, W)`` the key frames (harmonized per ``input_mode``).
        masks: ``(B, 1, H, W)`` float {0, 1} motion masks of the key frames at full resolution.
        targets: ``(B, 1, h, w)`` float {0, 1} masks at the prediction resolution
            ``h = H // output_stride`` (a pixel is positive when most of its window moves).
    """

    masks: Tensor
    targets: Tensor


class MotionSegmentationSampler(TaskSampler):
    """Key frames and their motion masks from a :class:`ClipBatch` of clips, on the device.

    Args:
        batch_size: clips per step for this task.
        image_size: side of the square crops of the clips' frames.
        input_mode: ``"rgb"`` or ``"lab_gray"`` (harmonized input).
        clip_length: frames per clip (>= 3, so that the key frame has frames on both sides).
        frame_stride: video frames between consecutive clip frames.
        masks: ``"auto"``: use the source's precomputed masks when it has them, else compute
            them; ``"compute"``: always compute; ``"precomputed"``: require precomputed masks.
        mask_threshold: residual grey-level difference above which a pixel moves (see
            :class:`~mtssl_lightning.data.motion.MotionMaskConfig`).
        mask_open_size: opening structuring element side (odd).
        mask_close_size: closing structuring element side (odd).
        mask_min_area: components smaller than this fraction of the frame are dropped.
        output_stride: input pixels per predicted pixel.
    """

    source = "videos"

    def __init__(
        self,
        batch_size: int = 32,
        image_size: int = 224,
        input_mode: InputMode = "rgb",
        crop_area: tuple[float, float] | None = None,
        clip_length: int = 5,
        frame_stride: int = 2,
        masks: MaskSource = "auto",
        mask_threshold: float = 0.05,
        mask_open_size: int = 3,
        mask_close_size: int = 7,
        mask_min_area: float = 0.005,
        output_stride: int = 4,
    ) -> None:
        super().__init__(batch_size=batch_size, image_size=image_size, input_mode=input_mode, crop_area=crop_area)
        if clip_length < 3:
            raise ValueError(
                f"MotionSegmentation: `clip_length` must be >= 3 (frames before and after the key frame), got {clip_length}"
            )
        if frame_stride < 1:
            raise ValueError(f"MotionSegmentation: `frame_stride` must be >= 1, got {frame_stride}")
        if masks not in ("auto", "compute", "precomputed"):
            raise ValueError(f"MotionSegmentation: `masks` must be 'auto', 'compute' or 'precomputed', got {masks!r}")
        if output_stride < 1:
            raise ValueError(f"MotionSegmentation: `output_stride` must be >= 1, got {output_stride}")
        self.clip_length, self.frame_stride, self.masks = clip_length, frame_stride, masks
        self.mask_config = MotionMaskConfig(mask_threshold, mask_open_size, mask_close_size, mask_min_area)
        self.output_stride = output_stride

    def data_request(self) -> DataRequest:
        """Clips of ``clip_length`` frames ``frame_stride`` apart, cropped to ``image_size``."""
        return DataRequest(
            source="videos",
            batch_size=self.batch_size,
            image_size=self.image_size,
            clip_length=self.clip_length,
            frame_stride=self.frame_stride,
            crop_area=self.crop_area,
        )

    def _prepare(self, batch: ImageBatch | ClipBatch, generator: torch.Generator | None) -> MotionSegmentationBatch:
        """Key frames and their masks from a :class:`ClipBatch` (precomputed masks per ``masks``)."""
        if not isinstance(batch, ClipBatch):
            raise TypeError(
                "MotionSegmentation reads video clips (ClipBatch) from a video source, got "
                f"{type(batch).__name__}; configure `data.video_root` (or use the sample video)"
            )
        clips = batch.clips.float().div_(255.0)
        masks = None
        if batch.masks is not None and self.masks != "compute":
            masks = batch.masks.float()
        elif self.masks == "precomputed":
            raise ValueError(
                "MotionSegmentation(masks='precomputed') but the video source has no precomputed masks; "
                "add mask PNGs beside the frames or set `masks: auto`"
            )
        return self.build(clips, masks)

    @torch.no_grad()
    def build(self, images: Tensor, masks: Tensor | None = None, generator: torch.Generator | None = None) -> MotionSegmentationBatch:
        """Inputs and targets from clips (deterministic: ``generator`` is unused).

        Args:
            images: ``(B, T, 3, H, W)`` clips, float RGB in [0, 1] (the key frame is ``T // 2``).
            masks: ``(B, 1, H, W)`` precomputed masks of the key frames; ``None`` = compute them.
        """
        if images.ndim != 5:
            raise ValueError(f"MotionSegmentation.build needs clips (B, T, 3, H, W), got {tuple(images.shape)}")
        if masks is None:
            masks = motion_masks(images, self.mask_config)
        key = images[:, images.shape[1] // 2]
        size = (key.shape[-2] // self.output_stride, key.shape[-1] // self.output_stride)
        targets = (F.interpolate(masks, size=size, mode="area") >= 0.5).float()
        return MotionSegmentationBatch(inputs=self.harmonize(key), masks=masks, targets=targets)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, clip_length={self.clip_length}, "
            f"frame_stride={self.frame_stride}, masks={self.masks!r})"
        )


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


class _PixelCounts(Metric):
    """True-positive, false-positive and false-negative pixels of the moving class, over the epoch.

    Not torchmetrics' ``BinaryJaccardIndex`` / ``BinaryF1Score``: their ``update`` validates the
    inputs and builds a confusion matrix with ``bincount``, which synchronises the host with the
    GPU on every training step. Here ``update`` only sums (float64 states, exact to 2^53 pixels,
    summed across processes); the values are the same.

    ``update(probabilities, targets)``: ``probabilities`` of any shape, a pixel is predicted moving
    when its probability is above ``threshold`` (0.5, as torchmetrics); ``targets`` of the same
    shape, moving where equal to 1.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    tp: Tensor
    fp: Tensor
    fn: Tensor

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probabilities: Tensor, targets: Tensor) -> None:
        predicted, moving = probabilities > self.threshold, targets == 1
        hits = (predicted & moving).sum()
        self.tp += hits
        self.fp += predicted.sum() - hits
        self.fn += moving.sum() - hits

    @staticmethod
    def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
        """``numerator / denominator`` as float32, 0 where the denominator is 0 (torchmetrics' ``zero_division=0``)."""
        return torch.where(denominator > 0, numerator / denominator.clamp_min(1.0), 0.0).to(torch.float32)


class MovingIoU(_PixelCounts):
    """IoU of the moving class, ``tp / (tp + fp + fn)`` over all pixels seen (0 if there are none)."""

    def compute(self) -> Tensor:
        return self._ratio(self.tp, self.tp + self.fp + self.fn)


class ConstantIoU(Metric):
    """The no-learning reference of :class:`MovingIoU`: the IoU of the best constant prediction.

    Predicting "static" everywhere scores 0; predicting "moving" everywhere scores
    ``#moving / #pixels`` (every moving pixel hit, every other a false positive). So a net whose
    ``iou`` is above this uses the image. ``update(probabilities, targets)`` like :class:`MovingIoU`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    moving: Tensor
    pixels: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("moving", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixels", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probabilities: Tensor, targets: Tensor) -> None:
        self.moving += (targets == 1).sum()
        self.pixels += targets.numel()

    def compute(self) -> Tensor:
        return _PixelCounts._ratio(self.moving, self.pixels)


class MovingFMeasure(_PixelCounts):
    """F-measure (F1) of the moving class, ``2 tp / (2 tp + fp + fn)`` over all pixels seen (0 if none)."""

    def compute(self) -> Tensor:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------


class MotionSegmentation(Task):
    """Predict the independently moving pixels of a video frame from the frame alone.

    Args:
        loss_weight: weight of this task's loss in the weighted-sum mode.
        pos_weight: weight of the positive (moving) pixels in the cross-entropy; ``None`` =
            ``#negative / #positive`` of each batch, clamped to [1, 100].
        head_channels: width of the dense head's hidden convolutions.
        **sampling: the sampling settings (clips, masks), arguments of
            :class:`MotionSegmentationSampler` (``batch_size``, ``image_size``, ``input_mode``,
            ``clip_length``, ``frame_stride``, ``masks``, ``mask_*``, ``output_stride``); the
            sampler is ``task.sampler``.
    """

    sampler: MotionSegmentationSampler

    def __init__(self, loss_weight: float = 1.0, pos_weight: float | None = None, head_channels: int = 128, **sampling: Any) -> None:
        super().__init__(MotionSegmentationSampler(**sampling), loss_weight)
        if pos_weight is not None and pos_weight <= 0:
            raise ValueError(f"MotionSegmentation: `pos_weight` must be positive or null, got {pos_weight}")
        self.pos_weight, self.head_channels = pos_weight, head_channels

    def build_head(self, channels: int, stride: int) -> nn.Module:
        """A :class:`DenseHead` with one logit per pixel at ``output_stride``."""
        return DenseHead(channels, stride, 1, self.sampler.output_stride, self.head_channels)

    def forward(self, features: Tensor, batch: TaskBatch) -> Tensor:
        """``(B, C, h, w)`` features -> ``(B, 1, H/4, W/4)`` logits at the targets' resolution."""
        assert self.head is not None, "call attach() before forward()"
        assert isinstance(batch, MotionSegmentationBatch)
        return self.head(features, size=tuple(batch.targets.shape[-2:]))

    def loss(self, prediction: Tensor, batch: TaskBatch) -> Tensor:
        """Mean per-pixel sigmoid cross-entropy, positives weighted by ``pos_weight``."""
        assert isinstance(batch, MotionSegmentationBatch)
        targets = batch.targets
        if self.pos_weight is None:
            positives = targets.sum()
            weight = ((targets.numel() - positives) / positives).clamp(1.0, 100.0)  # inf (no positive) -> 100
        else:
            # filled on the device; torch.tensor(value, device=...) would be a blocking copy from the host
            weight = torch.full((), self.pos_weight, device=targets.device)
        return F.binary_cross_entropy_with_logits(prediction.float(), targets, pos_weight=weight)

    def make_metrics(self) -> MetricCollection:
        """``iou`` and ``f_measure`` of the moving class, from pixel counts over the epoch, and
        ``iou_constant`` (:class:`ConstantIoU`), the IoU of the best constant prediction."""
        # one set of pixel counts serves both (a compute group: one update per step)
        metrics = {"iou": MovingIoU(), "f_measure": MovingFMeasure(), "iou_constant": ConstantIoU()}
        return MetricCollection(metrics, compute_groups=[["iou", "f_measure"]])

    def metric_inputs(self, prediction: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(probabilities, integer targets)``, both ``(B, 1, h, w)``; float32 also under autocast."""
        assert isinstance(batch, MotionSegmentationBatch)
        return torch.sigmoid(prediction.detach().float()), batch.targets.to(torch.int64)

    @torch.no_grad()
    def pictures(self, batch: TaskBatch, prediction: Tensor | None = None, max_items: int = 4) -> dict[str, Tensor]:
        """``"masks"``: one row per clip, ``[key frame | target mask overlaid | predicted mask overlaid]``.

        The key frame is the trunk's input; the target (``batch.targets``, the loss's mask at
        1/``output_stride``) and the prediction (``sigmoid(logits) > 0.5``) are blown up to the frame
        with nearest-neighbour interpolation and tinted over it (``TARGET_COLOUR`` /
        ``PREDICTION_COLOUR``, α = 0.5). Without ``prediction`` the rows are ``[frame | target]``.
        """
        assert isinstance(batch, MotionSegmentationBatch)
        frames = draw.as_rgb(batch.inputs[:max_items])
        columns = [frames, draw.overlay(frames, batch.targets[:max_items], draw.TARGET_COLOUR)]
        if prediction is not None:
            moving = (torch.sigmoid(prediction[:max_items].float()) > 0.5).float()
            columns.append(draw.overlay(frames, moving, draw.PREDICTION_COLOUR))
        return {"masks": draw.grid(torch.stack(columns, dim=1)).cpu()}
