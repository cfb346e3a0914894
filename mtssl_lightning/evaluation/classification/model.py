"""Classification on the (pretrained) trunk: a linear probe on the frozen trunk, or fine-tuning.

The paper's ImageNet protocol trains a linear classifier on the **frozen block-3
representation** (option: a freshly trained block 4 + linear). :class:`ImageClassifier` covers
both, and fine-tuning (``frozen: false``):

* the trunk comes from :func:`~mtssl_lightning.evaluation.backbone.pretrained_trunk` (a
  checkpoint of ``mtssl fit`` / a trunk export, or a random-init ``trunk`` baseline) and is read
  through :class:`~mtssl_lightning.evaluation.backbone.TrunkRepresentation` (block output or a
  fresh lasso row; a frozen trunk stays in eval mode, its BN statistics never move);
* pooling: **global average pooling** of the block output (``pool_size: 1``, default), then
  the linear layer. ``pool_size: s`` keeps an ``s × s`` average-pooled grid instead
  (``C·s²`` inputs), the usual way to give a linear probe more spatial information. The
  paper's exact pooling of block 3 is not published in the sources we have; global average
  pooling is our assumption;
* ``bn: true`` puts a parameter-free ``BatchNorm1d`` before the linear layer, a common probe
  trick that makes one learning rate work for features of any scale (off by default, as the
  paper does not mention it);
* ``probe_units``: extra linear probes, each on the pooled output of one unit of the last
  block (``TrunkOutput.units[i]``), trained in the same run on **detached** features (so they
  never change the trunk or each other); metrics ``{stage}/top1_unit{i}``.

Logged: ``train/loss`` and ``train/lr`` (the head's learning rate, every step), ``{val,test}/loss``,
``{train,val,test}/top1`` and, for more than 5 classes, ``/top5`` (fractions in [0, 1]).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mtssl_lightning.evaluation.backbone import Representation, SavesTrunkSpec, TrunkRepresentation, pretrained_trunk
from mtssl_lightning.evaluation.classification.data import LabelledBatch
from mtssl_lightning.tasks.heads import GlobalAvgPool
from mtssl_lightning.trunks.base import Trunk

Head = Literal["linear", "block4_linear"]


def classification_metrics(num_classes: int) -> MetricCollection:
    """Top-1 (and, for more than 5 classes, top-5) accuracy as fractions: keys ``top1``, ``top5``."""
    metrics: dict[str, Any] = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


def linear_probe(channels: int, num_classes: int, pool_size: int = 1, bn: bool = False) -> nn.Sequential:
    """``(B, C, h, w) -> (B, num_classes)``: average pool to ``pool_size²`` cells, flatten, [BN], linear.

    The linear layer starts at N(0, 0.01²) weights and zero bias (the usual probe init).
    """
    dim = channels * pool_size * pool_size
    # a plain mean for one cell: AdaptiveAvgPool2d's CUDA backward has no deterministic kernel (fine-tuning)
    layers: list[nn.Module] = [GlobalAvgPool()] if pool_size == 1 else [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten()]
    if bn:
        layers.append(nn.BatchNorm1d(dim, affine=False))  # standardises features, no learnt scale
    fc = nn.Linear(dim, num_classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    layers.append(fc)
    return nn.Sequential(*layers)


STAGES = ("train", "val", "test")


class ImageClassifier(SavesTrunkSpec, pl.LightningModule):
    """Classification on the (pretrained) trunk: linear probe (``frozen: true``) or fine-tuning.

    Args:
        num_classes: number of classes; ``None`` takes it from the datamodule
            (``datamodule.num_classes``) when the run starts.
        checkpoint: an ``mtssl fit`` checkpoint or a trunk export; ``None`` evaluates ``trunk``
            as initialised (the random-init baseline).
        trunk: the trunk used when ``checkpoint`` is ``None``.
        frozen: ``True``: the linear-probe protocol (trunk weights and BN statistics fixed);
            ``False``: the whole network is fine-tuned.
        head: ``"linear"`` (pool + linear on the block output) or ``"block4_linear"`` (a freshly
            initialised block 4, :meth:`ResNetV2.next_block`, trained, then pool + linear: the
            paper's option).
        representation: ``"features"`` (block output) or ``"lasso"`` (a new α over the last
            block's units, trained with the head).
        pool_size: average-pool the features to ``pool_size × pool_size`` before the linear
            layer (1 = global average pooling, the default and our assumption for the paper).
        bn: a parameter-free BatchNorm1d before the linear layer (common probe trick; off).
        probe_units: extra linear probes on the pooled, detached outputs of these units of the
            last block (0-based indices into ``TrunkOutput.units``); metrics ``…/top1_unit{i}``.
            Their losses are added to the main loss (they never interact: detached inputs).
        label_smoothing: of the cross-entropy.
        optimizer: builds the optimizer from parameter groups (default: SGD lr 0.01, momentum
            0.9); only trainable parameters are passed.
        lr_scheduler: optional; stepped every ``lr_interval``.
        lr_interval: ``"epoch"`` or ``"step"``.
        trunk_lr_scale: fine-tuning: the trunk's learning rate is the optimizer's times this.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        checkpoint: str | None = None,
        trunk: Trunk | None = None,
        frozen: bool = True,
        head: Head = "linear",
        representation: Representation = "features",
        pool_size: int = 1,
        bn: bool = False,
        probe_units: list[int] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: Literal["epoch", "step"] = "epoch",
        trunk_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["trunk", "optimizer", "lr_scheduler"])
        if head not in ("linear", "block4_linear"):
            raise ValueError(f"`model.head` must be 'linear' or 'block4_linear', got {head!r}")
        if pool_size < 1:
            raise ValueError(f"`model.pool_size` must be >= 1, got {pool_size}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"`model.num_classes` must be >= 2, got {num_classes}")
        if lr_interval not in ("epoch", "step"):
            raise ValueError(f"`model.lr_interval` must be 'epoch' or 'step', got {lr_interval!r}")
        if trunk_lr_scale < 0:
            raise ValueError(f"`model.trunk_lr_scale` must be >= 0, got {trunk_lr_scale}")
        base = pretrained_trunk(checkpoint, trunk)
        self.representation = TrunkRepresentation(base, frozen=frozen, representation=representation)
        probe_units = list(probe_units or [])
        bad = [i for i in probe_units if not 0 <= i < base.num_units]
        if bad:
            raise ValueError(
                f"`model.probe_units` {bad} out of range: the trunk's last block has {base.num_units} units (0-{base.num_units - 1})"
            )
        self.block4: nn.Module | None = None
        channels = base.out_channels
        if head == "block4_linear":
            next_block = getattr(base, "next_block", None)
            if next_block is None:
                raise ValueError(
                    f"`model.head: block4_linear` needs a trunk with `next_block()` (ResNetV2); {type(base).__name__} has none"
                )
            self.block4 = next_block(stride=1)
            channels = int(self.block4.out_channels)
        self.head_channels, self.pool_size, self.bn = channels, pool_size, bn
        self.probe_units, self.label_smoothing = probe_units, label_smoothing
        self.frozen = frozen
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.lr_interval, self.trunk_lr_scale = lr_interval, trunk_lr_scale
        self.num_classes = num_classes
        self.classifier: nn.Module | None = None
        if num_classes is not None:
            self._build(num_classes)

    @property
    def trunk(self) -> Trunk:
        """The trunk (what :class:`~mtssl_lightning.evaluation.knn.KNNEvaluation` embeds with)."""
        return self.representation.trunk  # type: ignore[return-value]

    def _build(self, num_classes: int) -> None:
        """Create the heads and metrics for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.hparams["num_classes"] = num_classes  # saved in checkpoints, so load_from_checkpoint works
        self.classifier = linear_probe(self.head_channels, num_classes, self.pool_size, self.bn)
        self.unit_probes = nn.ModuleDict(
            {
                str(i): linear_probe(self.trunk.out_channels, num_classes, self.pool_size, self.bn)
                for i in self.probe_units
            }
        )
        # keys "<stage>_…": a ModuleDict key may not shadow a method such as Module.train
        self.metrics = nn.ModuleDict(
            {f"{stage}_all": classification_metrics(num_classes).clone(prefix=f"{stage}/") for stage in STAGES}
        )
        self.unit_metrics = nn.ModuleDict(
            {
                f"{stage}_{i}": MulticlassAccuracy(num_classes, top_k=1, average="micro")
                for stage in STAGES
                for i in self.probe_units
            }
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if self.classifier is None:
            if data_classes is None:
                raise ValueError(
                    "`model.num_classes` is not set and the datamodule does not say how many classes there are; set it"
                )
            self._build(int(data_classes))
        elif data_classes is not None and int(data_classes) != self.num_classes:
            raise ValueError(
                f"`model.num_classes` is {self.num_classes} but the data has {data_classes} classes; make them agree (or set it to null)"
            )

    # -------------------------------------------------------------------- forward
    def forward_all(self, images: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """``(B, 3, H, W)`` in [0, 1] -> main logits ``(B, K)`` and ``{unit: (B, K)}`` of the unit probes."""
        if self.classifier is None:
            raise RuntimeError("the classifier has no head yet: give `num_classes` or run it with a datamodule")
        rep = self.representation
        # a frozen trunk needs no graph (saves memory); the lasso row after it still learns
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = rep.trunk(images)
        features = out.features if rep.mixer is None else rep.mixer(out.units)
        if self.block4 is not None:
            features = self.block4(features)
        logits = self.classifier(features)
        unit_logits = {i: self.unit_probes[str(i)](out.units[i].detach()) for i in self.probe_units}
        return logits, unit_logits

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] -> logits ``(B, num_classes)``."""
        return self.forward_all(images)[0]

    def _step(self, batch: LabelledBatch, stage: str) -> Tensor:
        logits, unit_logits = self.forward_all(batch.images)
        labels = batch.labels
        size = labels.shape[0]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        metrics = self.metrics[f"{stage}_all"]
        metrics.update(logits.detach(), labels)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=size)
        for i, unit_out in unit_logits.items():
            loss = loss + F.cross_entropy(unit_out, labels, label_smoothing=self.label_smoothing)
            metric = self.unit_metrics[f"{stage}_{i}"]
            metric.update(unit_out.detach(), labels)
            self.log(f"{stage}/top1_unit{i}", metric, on_step=False, on_epoch=True, batch_size=size)
        training = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=training,
            on_epoch=not training,
            prog_bar=True,
            batch_size=size,
            sync_dist=not training,
        )
        return loss

    def training_step(self, batch: LabelledBatch, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        if isinstance(optimizer, torch.optim.Optimizer):  # the head's learning rate (a logger-free LR monitor)
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=len(batch))
        return self._step(batch, "train")

    def validation_step(self, batch: LabelledBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: LabelledBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: LabelledBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(B, num_classes)``."""
        return self(batch.images).softmax(dim=1)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        trunk_ids = {id(p) for p in self.trunk.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        head = [p for p in trainable if id(p) not in trunk_ids]
        trunk = [p for p in trainable if id(p) in trunk_ids]  # empty when frozen
        groups = [{"params": head}] + ([{"params": trunk}] if trunk else [])
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(groups)
        if trunk:
            optimizer.param_groups[1]["lr"] *= self.trunk_lr_scale  # before any scheduler reads it
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": self.lr_interval},
        }
