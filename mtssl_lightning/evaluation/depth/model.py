"""Monocular depth from the (pretrained) trunk: up-projection decoder, berHu / L1, the LightningModule.

**Model** (:class:`DepthEstimator`): trunk (``frozen`` or fine-tuned) → 1×1 conv + BN →
up-projection blocks ×2 each until ``output_stride`` (default 1/4 of the input) → 3×3 conv
to one channel → bilinear to the input size → ``softplus + 1e-3``: depth in metres, always
positive (softplus rather than exp so that early, badly scaled outputs give bounded gradients).
Loss: berHu (:func:`berhu_loss`) or L1 over the valid pixels. Metrics:
:class:`~mtssl_lightning.evaluation.depth.metrics.DepthMetrics`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mtssl_lightning.evaluation.backbone import Representation, SavesTrunkSpec, TrunkRepresentation, pretrained_trunk
from mtssl_lightning.evaluation.depth.data import DepthBatch
from mtssl_lightning.evaluation.depth.metrics import MIN_DEPTH, DepthMetrics
from mtssl_lightning.tasks.heads import resize_bilinear
from mtssl_lightning.trunks import ResNetV2, Trunk
from mtssl_lightning.trunks.base import apply_speed_options

INIT_DEPTH = 2.5  # metres: the decoder starts near NYU's typical depth instead of softplus(0) = 0.69

Loss = Literal["berhu", "l1"]
Upsample = Literal["unpool", "nearest"]


# --------------------------------------------------------------------------- losses
def berhu_loss(pred: Tensor, target: Tensor, valid: Tensor, fraction: float = 0.2) -> Tensor:
    """Reverse Huber (berHu) loss of Laina et al. 2016, averaged over the valid pixels.

    With ``x = pred - target`` and ``c = fraction · max |x|`` over the batch's valid pixels
    (a constant: no gradient through the max), ``B(x) = |x|`` for ``|x| <= c`` and
    ``(x² + c²) / (2c)`` above (the two meet at ``|x| = c``): the reverse of ``torch.nn.HuberLoss``
    (quadratic below its threshold), hence written out here.

    Args:
        pred, target: ``(B, 1, H, W)`` depth in metres.
        valid: ``(B, 1, H, W)`` bool.

    Returns a scalar; 0 (still differentiable) when no pixel is valid.
    """
    diff = (pred - target).abs()[valid]
    if diff.numel() == 0:
        return pred.sum() * 0.0
    c = fraction * diff.detach().max()
    quadratic = (diff.square() + c.square()) / (2.0 * c.clamp_min(1e-12))
    return torch.where(diff <= c, diff, quadratic).mean()


def l1_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean ``|pred - target|`` over the valid pixels (shapes as :func:`berhu_loss`)."""
    diff = (pred - target).abs()[valid]
    return diff.mean() if diff.numel() else pred.sum() * 0.0


# --------------------------------------------------------------------------- decoder
def unpool2x(x: Tensor) -> Tensor:
    """Laina et al.'s unpooling: ``(B, C, h, w) -> (B, C, 2h, 2w)``, each value at the top-left
    of its 2×2 cell, zeros elsewhere."""
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, h, 2, w, 2)
    out[:, :, :, 0, :, 0] = x
    return out.view(b, c, 2 * h, 2 * w)


class UpProjection(nn.Module):
    """Up-projection block (Laina et al. 2016): ×2 up, then
    ``ReLU(BN(conv3(ReLU(BN(conv5(x))))) + BN(conv5'(x)))``.

    ``(B, in_channels, h, w) -> (B, out_channels, 2h, 2w)``; ``upsample``: ``"unpool"`` (the
    paper's zero-filled unpooling) or ``"nearest"``.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: Upsample = "unpool") -> None:
        super().__init__()
        if upsample not in ("unpool", "nearest"):
            raise ValueError(f"`upsample` must be 'unpool' or 'nearest', got {upsample!r}")
        self.upsample = upsample
        self.conv1 = nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.project = nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False)
        self.bn_project = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = unpool2x(x) if self.upsample == "unpool" else F.interpolate(x, scale_factor=2.0, mode="nearest")
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(branch + self.bn_project(self.project(x)))


class UpProjectionDecoder(nn.Module):
    """1×1 conv + BN to ``channels``, then ``blocks`` up-projections (halving the channels each
    time, at least 8), then a 3×3 conv to one channel.

    ``(B, in_channels, h, w) -> (B, 1, h · 2^blocks, w · 2^blocks)`` (pre-activation depth).
    """

    def __init__(self, in_channels: int, channels: int, blocks: int, upsample: Upsample = "unpool") -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        layers = []
        for _ in range(blocks):
            out = max(8, channels // 2)
            layers.append(UpProjection(channels, out, upsample))
            channels = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.constant_(self.head.bias, math.log(math.expm1(INIT_DEPTH - MIN_DEPTH)))  # softplus⁻¹

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.blocks(self.reduce(features)))


class DepthEstimator(SavesTrunkSpec, pl.LightningModule):
    """NYU depth v2 transfer: trunk + up-projection decoder, berHu or L1 loss, :class:`DepthMetrics`.

    Args:
        checkpoint: pretraining checkpoint or trunk export to transfer (``None``: ``trunk`` as
            initialised, the random-init baseline).
        trunk: the trunk when ``checkpoint`` is ``None`` (default ResNet-v2-101 cut after block 3).
        frozen: keep the trunk fixed (weights and BN statistics) and train only the decoder;
            default ``False``: the whole network is fine-tuned, as in the paper's depth transfer.
        representation: ``"features"`` (block output) or ``"lasso"`` (a new lasso row over the
            last block's units, trained with the decoder).
        decoder_channels: channels after the 1×1 reduction (``None``: half the trunk's, as
            Laina et al.'s 2048 → 1024); every up-projection halves them.
        output_stride: stride of the decoder's output relative to the input (4 or 2, or any
            power of two below the trunk's); one up-projection per factor 2 from the trunk's stride.
        upsample: ``"unpool"`` (Laina et al.) or ``"nearest"`` in the up-projections.
        loss: ``"berhu"`` (Laina et al.) or ``"l1"``.
        berhu_fraction: berHu's ``c`` as a fraction of the batch's largest absolute residual.
        optimizer: builds the optimizer from the trainable parameters (default: SGD, lr 0.01,
            momentum 0.9, an assumption after Laina et al.; the paper gives no settings).
        lr_scheduler: optional; stepped every training step.
        channels_last: the trunk runs in channels-last memory format (applied in ``configure_model``).
        compile: ``torch.compile`` the trunk in place (applied in ``configure_model``).

    ``forward((B, 3, H, W) RGB in [0, 1]) -> (B, 1, H, W)`` depth in metres (> 0). Logs
    ``train/loss``, ``{val,test}/loss`` and ``{val,test}/{delta1,delta2,delta3,abs_rel,rmse,log10}``.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        trunk: Trunk | None = None,
        frozen: bool = False,
        representation: Representation = "features",
        decoder_channels: int | None = None,
        output_stride: int = 4,
        upsample: Upsample = "unpool",
        loss: Loss = "berhu",
        berhu_fraction: float = 0.2,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["trunk", "optimizer", "lr_scheduler"])
        if loss not in ("berhu", "l1"):
            raise ValueError(f"`loss` must be 'berhu' or 'l1', got {loss!r}")
        if not 0.0 < berhu_fraction <= 1.0:
            raise ValueError(f"`berhu_fraction` must be in (0, 1], got {berhu_fraction}")
        if checkpoint is None and trunk is None:
            trunk = ResNetV2()
        self.backbone = TrunkRepresentation(pretrained_trunk(checkpoint, trunk), frozen=frozen, representation=representation)
        stride = self.backbone.out_stride
        if output_stride < 1 or output_stride & (output_stride - 1) or output_stride >= stride:
            raise ValueError(
                f"`output_stride` must be a power of two below the trunk's output stride {stride}, got {output_stride}"
            )
        if stride & (stride - 1):
            raise ValueError(f"the trunk's output stride {stride} is not a power of two; the decoder doubles resolution")
        channels = decoder_channels or max(8, self.backbone.out_channels // 2)
        blocks = round(math.log2(stride // output_stride))
        self.decoder = UpProjectionDecoder(self.backbone.out_channels, channels, blocks, upsample)
        self.loss_name, self.berhu_fraction = loss, berhu_fraction
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.channels_last, self.compile_trunk = channels_last, compile
        self.val_metrics, self.test_metrics = DepthMetrics(), DepthMetrics()

    @property
    def trunk(self) -> Trunk:
        """The (pretrained) trunk inside the representation."""
        return self.backbone.trunk

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.decoder(self.backbone(images))
        # bilinear as two matrix products: deterministic backward on CUDA (F.interpolate's is not)
        x = resize_bilinear(x.float(), tuple(images.shape[-2:]))
        return F.softplus(x) + MIN_DEPTH

    def criterion(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """The configured loss (:func:`berhu_loss` or :func:`l1_loss`) over the valid pixels."""
        if self.loss_name == "berhu":
            return berhu_loss(pred, target, valid, self.berhu_fraction)
        return l1_loss(pred, target, valid)

    def predict_depth(self, batch: DepthBatch) -> Tensor:
        """``(B, 1, h, w)`` metres at the size of ``batch.depth`` (bilinear from the input size)."""
        pred = self(batch.images)
        if pred.shape[-2:] != batch.depth.shape[-2:]:
            pred = F.interpolate(pred, size=batch.depth.shape[-2:], mode="bilinear", align_corners=False)
        return pred

    def configure_model(self) -> None:
        """channels-last / compile before a strategy wraps the model and the optimizers are made."""
        if not getattr(self, "_speed_options_applied", False):
            apply_speed_options(self.trunk, self.channels_last, self.compile_trunk)
            self._speed_options_applied = True

    def training_step(self, batch: DepthBatch, batch_idx: int) -> Tensor:
        loss = self.criterion(self.predict_depth(batch), batch.depth, batch.valid)
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch: DepthBatch, stage: str, metrics: DepthMetrics) -> None:
        pred = self.predict_depth(batch)
        loss = self.criterion(pred, batch.depth, batch.valid)
        self.log(f"{stage}/loss", loss, batch_size=len(batch), on_step=False, on_epoch=True, sync_dist=True)
        metrics.update(pred, batch.depth, batch.valid)

    def _log_metrics(self, stage: str, metrics: DepthMetrics) -> None:
        values = metrics.compute()  # synchronised across processes
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        metrics.reset()

    def validation_step(self, batch: DepthBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: DepthBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: DepthBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """``(B, 1, h, w)`` predicted depth in metres, at the size of the batch's depth maps."""
        return self.predict_depth(batch)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # a frozen trunk's are left out
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}
