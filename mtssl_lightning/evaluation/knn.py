"""k-nearest-neighbour evaluation of a trunk: no training, just its pooled block-3 features.

A query image is classified by its ``k`` most cosine-similar training images (features
globally average-pooled and L2-normalised), each voting for its label with weight
``exp(sim / T)`` (Wu et al. 2018, "Unsupervised feature learning via non-parametric instance
discrimination": ``T = 0.07``, ``k = 20`` our defaults) or ``1`` (``weighting: uniform``, plain
majority). Ties between classes go to the lowest class index.

* :func:`knn_scores` / :func:`knn_predict`: the pure, batched computation;
* :class:`KNNAccuracy`: a torchmetrics metric holding the bank of training features;
* :class:`KNNEvaluation`: a callback that, every N validation runs of any module with a
  ``.trunk`` (:class:`~mtssl_lightning.MultiTaskSSL` during pretraining,
  :class:`~mtssl_lightning.evaluation.classification.ImageClassifier`), embeds a labelled
  train and val set and logs ``knn/top1``;
* :class:`KNNClassifier`: the offline version for ``mtssl validate --config configs/eval/knn.yaml``,
  logging ``val/knn_top1`` (``test/knn_top1`` under ``mtssl test``).

Memory: the bank is ``N × C`` float32 on the module's device (ImageNet train with a 1024-channel
block 3: 1.28 M × 1024 × 4 B ≈ 5.2 GB); similarities are computed for ``chunk_size`` queries
at a time (``chunk_size × N`` floats).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import Metric

from mtssl_lightning.evaluation.backbone import freeze, pretrained_trunk
from mtssl_lightning.evaluation.classification import ClassificationDataModule, LabelledBatch
from mtssl_lightning.trunks.base import Trunk

log = logging.getLogger(__name__)

Weighting = Literal["exp", "uniform"]

#: Wu et al. 2018's temperature and neighbour count
DEFAULT_TEMPERATURE = 0.07
DEFAULT_K = 20


def knn_scores(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    weighting: Weighting = "exp",
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted votes of the ``k`` nearest bank entries (cosine similarity) for every class.

    Args:
        query: ``(Q, D)`` features (L2-normalised here).
        bank: ``(N, D)`` features of the labelled set (L2-normalised here).
        bank_labels: ``(N,)`` int64 labels in ``[0, num_classes)``.
        k: neighbours (more than ``N`` means all of them).
        temperature: ``T`` of the ``exp(sim / T)`` weights.
        num_classes: number of classes (default ``bank_labels.max() + 1``).
        weighting: ``"exp"`` (``exp(sim / T)``) or ``"uniform"`` (1 per neighbour).
        chunk_size: queries per similarity matrix (bounds memory to ``chunk_size × N``).

    Returns:
        ``(Q, num_classes)`` float32 sum of the neighbours' weights per class.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"query (Q, D) and bank (N, D) must be 2-D with the same D, got {tuple(query.shape)} and {tuple(bank.shape)}"
        )
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels must be (N,) = ({bank.shape[0]},), got {tuple(bank_labels.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0, chunk_size >= 1; got k={k}, temperature={temperature}, chunk_size={chunk_size}"
        )
    if weighting not in ("exp", "uniform"):
        raise ValueError(f"`weighting` must be 'exp' or 'uniform', got {weighting!r}")
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float().to(bank.device), dim=1)
    labels = bank_labels.to(device=bank.device, dtype=torch.int64)
    k = min(k, bank.shape[0])
    out = torch.zeros(query.shape[0], num_classes, dtype=torch.float32, device=bank.device)
    for start in range(0, query.shape[0], chunk_size):
        sims = query[start : start + chunk_size] @ bank.T  # (q, N) cosine similarities
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp() if weighting == "exp" else torch.ones_like(top_sims)
        out[start : start + chunk_size].scatter_add_(1, labels[top_idx], weights)
    return out


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    weighting: Weighting = "exp",
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted class ``(Q,)`` int64 of every query: the class with most (weighted) votes among
    its ``k`` cosine-nearest bank entries (see :func:`knn_scores`; ties -> lowest class index)."""
    return knn_scores(query, bank, bank_labels, k, temperature, num_classes, weighting, chunk_size).argmax(dim=1)


class KNNAccuracy(Metric):
    """Top-1 accuracy of the kNN classifier over a bank of labelled features.

    Call :meth:`set_bank` with the training features first, then ``update(features, labels)``
    with query batches; ``compute()`` gives the fraction of correct predictions. ``reset()``
    clears the counts, not the bank.

    Args:
        k, temperature, weighting, chunk_size: see :func:`knn_scores`.
        num_classes: default ``bank_labels.max() + 1`` at :meth:`set_bank`.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        weighting: Weighting = "exp",
        num_classes: int | None = None,
        chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.k, self.temperature, self.weighting = k, temperature, weighting
        self.num_classes, self.chunk_size = num_classes, chunk_size
        self.bank: Tensor | None = None
        self.bank_labels: Tensor | None = None
        self.add_state("correct", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def set_bank(self, features: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
        """Store ``(N, D)`` training features (L2-normalised here) and their ``(N,)`` labels."""
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"bank features must be (N, D) with labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        self.bank = F.normalize(features.detach().float(), dim=1)
        self.bank_labels = labels.detach().to(device=features.device, dtype=torch.int64)
        if num_classes is not None:
            self.num_classes = num_classes
        elif self.num_classes is None:
            self.num_classes = int(self.bank_labels.max()) + 1

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Classify ``(B, D)`` query features and count the ones matching ``(B,)`` labels."""
        if self.bank is None or self.bank_labels is None:
            raise RuntimeError("KNNAccuracy has no bank: call set_bank(train_features, train_labels) first")
        bank, bank_labels = self.bank.to(features.device), self.bank_labels.to(features.device)
        pred = knn_predict(
            features, bank, bank_labels, self.k, self.temperature, self.num_classes, self.weighting, self.chunk_size
        )
        self.correct += (pred == labels.to(pred.device)).sum()
        self.total += labels.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


# ------------------------------------------------------------------------------- embedding
def pooled_features(trunk: nn.Module, images: Tensor) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, C)`` float32 global average of the trunk's block output."""
    return trunk(images).features.float().mean(dim=(2, 3))


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, LabelledBatch):
        return batch.images, batch.labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"expected LabelledBatch or (images, labels) batches, got {type(batch).__name__}")


@torch.no_grad()
def embed(trunk: nn.Module, loader: Iterable[Any], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Pooled block features of every image of ``loader`` with the trunk in eval mode.

    The train/eval flag of every submodule of the trunk is restored afterwards (a frozen trunk
    inside a training model stays as it was).

    Args:
        trunk: maps ``(B, 3, H, W)`` in [0, 1] to a :class:`~mtssl_lightning.trunks.TrunkOutput`.
        loader: batches of :class:`LabelledBatch` or ``(images, labels)``; images float in [0, 1]
            (uint8 is divided by 255).
        device: where to run the trunk and keep the features.

    Returns:
        ``features (N, C)`` float32 and ``labels (N,)`` int64, on ``device``.
    """
    modes = {m: m.training for m in trunk.modules()}
    trunk.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            images, y = _unpack(batch)
            images = images.to(device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = images.float().div_(255.0)
            feats.append(pooled_features(trunk, images))
            labels.append(y.to(device=device, dtype=torch.int64))
    finally:
        for module, mode in modes.items():
            module.training = mode  # per module: .train(mode) would recurse and undo a frozen part's eval
    if not feats:
        raise ValueError("the loader given for kNN evaluation yielded no batches")
    return torch.cat(feats), torch.cat(labels)


# -------------------------------------------------------------------------------- callback
class KNNEvaluation(Callback):
    """Online kNN accuracy of ``pl_module.trunk``'s pooled block features: logs ``knn/top1``.

    Every ``every_n_val`` validation runs (sanity checks excluded) the training images
    (unaugmented, :meth:`ClassificationDataModule.train_eval_dataloader`) are embedded as the
    bank and the validation images are classified against it. The trunk runs without gradients
    in eval mode; its previous mode is restored. Works with any LightningModule with a ``.trunk``
    (``MultiTaskSSL`` — also in lasso mode, it reads the block output — and ``ImageClassifier``).

    Under DDP every rank embeds the whole sets (plain loaders, no distributed sampler) and logs
    the same value: keep the sets small (e.g. the digits, CIFAR or an ImageNet subset) online.

    Args:
        datamodule: a :class:`ClassificationDataModule` giving both sets, or
        train_loader, val_loader: loaders of ``LabelledBatch`` or ``(images, labels)`` batches.
        every_n_val: run on every n-th validation run.
        k, temperature, weighting: see :func:`knn_scores`.
        chunk_size: queries per similarity matrix.
    """

    def __init__(
        self,
        datamodule: ClassificationDataModule | None = None,
        train_loader: Iterable[Any] | None = None,
        val_loader: Iterable[Any] | None = None,
        every_n_val: int = 1,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        weighting: Weighting = "exp",
        chunk_size: int = 1024,
    ) -> None:
        if (datamodule is None) == (train_loader is None or val_loader is None):
            raise ValueError("KNNEvaluation needs either `datamodule` or both `train_loader` and `val_loader`")
        if every_n_val < 1:
            raise ValueError(f"`every_n_val` must be >= 1, got {every_n_val}")
        self.datamodule, self.train_loader, self.val_loader = datamodule, train_loader, val_loader
        self.every_n_val = every_n_val
        self.k, self.temperature, self.weighting, self.chunk_size = k, temperature, weighting, chunk_size
        self.val_runs = 0  # validation runs seen (kept in checkpoints)
        self.last: float | None = None

    def _loaders(self) -> tuple[Iterable[Any], Iterable[Any]]:
        if self.datamodule is not None:
            self.datamodule.setup("fit")
            if self.train_loader is None:  # build once: persistent workers survive between runs
                self.train_loader = self.datamodule.train_eval_dataloader()
                self.val_loader = self.datamodule.val_dataloader()
        assert self.train_loader is not None and self.val_loader is not None
        return self.train_loader, self.val_loader

    def evaluate(self, trunk: nn.Module, device: torch.device | str) -> float:
        """kNN top-1 of ``trunk`` on the configured sets (a fraction in [0, 1])."""
        train_loader, val_loader = self._loaders()
        bank, bank_labels = embed(trunk, train_loader, device)
        query, labels = embed(trunk, val_loader, device)
        num_classes = getattr(self.datamodule, "num_classes", None)
        num_classes = int(max(bank_labels.max(), labels.max())) + 1 if num_classes is None else num_classes
        pred = knn_predict(
            query, bank, bank_labels, self.k, self.temperature, num_classes, self.weighting, self.chunk_size
        )
        return (pred == labels).float().mean().item()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.val_runs % self.every_n_val:
            return
        trunk = getattr(pl_module, "trunk", None)
        if not isinstance(trunk, nn.Module):
            raise TypeError(
                f"KNNEvaluation needs a LightningModule with a `.trunk`; {type(pl_module).__name__} has none"
            )
        self.last = self.evaluate(trunk, pl_module.device)
        pl_module.log("knn/top1", self.last, on_epoch=True, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self.val_runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))


# ----------------------------------------------------------------------- offline module
class KNNClassifier(pl.LightningModule):
    """kNN evaluation as a LightningModule, for ``mtssl validate|test --config configs/eval/knn.yaml``.

    At the start of validation (test) the bank is built from the datamodule's training images
    (``train_eval_dataloader()``: unaugmented, so a :class:`ClassificationDataModule`); each
    validation batch is then classified against it. Logs ``val/knn_top1`` (``test/knn_top1``).
    The trunk is frozen; there is nothing to fit.

    Args:
        checkpoint: an ``mtssl fit`` checkpoint or a trunk export; ``None`` uses ``trunk``
            as initialised (random-init baseline).
        trunk: the trunk used when ``checkpoint`` is ``None``.
        k, temperature, weighting, chunk_size: see :func:`knn_scores`.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        trunk: Trunk | None = None,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        weighting: Weighting = "exp",
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["trunk"])
        self.trunk = freeze(pretrained_trunk(checkpoint, trunk))
        self.knn = nn.ModuleDict(
            {f"{stage}_knn": KNNAccuracy(k, temperature, weighting, chunk_size=chunk_size) for stage in ("val", "test")}
        )

    def train(self, mode: bool = True) -> KNNClassifier:
        super().train(mode)
        self.trunk.eval()  # frozen: BN statistics never move
        return self

    def _build_bank(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        loader_fn = getattr(datamodule, "train_eval_dataloader", None)
        if loader_fn is None:
            raise TypeError(
                "KNNClassifier needs a datamodule with `train_eval_dataloader()` (ClassificationDataModule) for its bank"
            )
        bank, labels = embed(self.trunk, loader_fn(), self.device)
        self.knn[f"{stage}_knn"].set_bank(bank, labels, getattr(datamodule, "num_classes", None))
        log.info("kNN bank: %d training images, %d-d features", bank.shape[0], bank.shape[1])

    def on_validation_start(self) -> None:
        self._build_bank("val")

    def on_test_start(self) -> None:
        self._build_bank("test")

    def _step(self, batch: LabelledBatch, stage: str) -> None:
        images, labels = _unpack(batch)
        metric = self.knn[f"{stage}_knn"]
        metric.update(pooled_features(self.trunk, images), labels)
        self.log(f"{stage}/knn_top1", metric, on_step=False, on_epoch=True, batch_size=labels.shape[0])

    def validation_step(self, batch: LabelledBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: LabelledBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        raise RuntimeError("KNNClassifier has nothing to train: run `mtssl validate` or `mtssl test`, not `fit`")
