"""Exemplar (Dosovitskiy et al., NIPS 2014) with a triplet loss, as scaled by Doersch & Zisserman 2017.

Each image of the batch is a pseudo-class of its own: ``views`` heavily augmented views of every
image are made on the device, the trunk embeds all ``B × V`` views, and the head maps each to an
L2-normalised embedding. The original Exemplar-CNN trains a softmax classifier over all
pseudo-classes, which does not scale to ImageNet; Doersch & Zisserman replaced it with a
**triplet loss** over the views of a batch: views of one image must be closer to each other than
to the views of the other images, by a ``margin``. Triplets are mined inside the batch:

* ``mining="semi_hard"`` (default; FaceNet, Schroff et al. 2015): every anchor-positive pair is
  paired with its semi-hard negative (see :func:`triplet_loss`);
* ``mining="batch_hard"`` (Hermans et al. 2017): the hardest positive and hardest negative per
  anchor.

Deviations from the papers / assumptions (all config options):

* **Distance.** Plain Euclidean distance between unit embeddings (``||x - y||₂ ∈ [0, 2]``), not
  the squared distance of FaceNet / TensorFlow-Addons' ``triplet_semihard_loss``; the default
  ``margin = 0.5`` is that of the later re-implementation the spec quotes, which also uses
  semi-hard mining and 8 views per image. Its embedding is 1000-d; ours defaults to 128-d
  (``embedding_dim``), which is plenty for the batch-level retrieval the loss asks for.
* **Augmentations** (Kornia, one :class:`kornia.augmentation.AugmentationSequential` over the
  repeated batch, every view drawn independently), in this order:

  1. ``RandomResizedCrop`` to ``view_size × view_size``: area fraction ``crop_scale``
     (default 0.25–1 of the image), aspect ratio ``crop_ratio`` (3/4–4/3). Dosovitskiy et al.
     scale a patch by 0.7–1.4 and translate it by up to 0.2 of its size; a random resized crop
     is the now-common equivalent (translation, scale and aspect in one op);
  2. ``RandomRotation`` uniform in ``±rotation`` degrees (default 20, as Dosovitskiy et al.),
     bilinear, corners outside the rotated view filled with black (Kornia's zero padding);
  3. ``RandomHorizontalFlip`` (p = 0.5);
  4. ``ColorJitter`` with probability ``jitter_p`` (0.8): ``brightness``, ``contrast``,
     ``saturation`` (0.4 each) and ``hue`` (0.1) — torchvision semantics — standing in for the
     original's "contrast 1/2" (principal-component and HSV power changes) and "colour" (hue
     shift) transformations;
  5. ``RandomGrayscale`` with probability ``grey_p`` (0.2, the common setting; the spec quotes a
     re-implementation that used 0.66 — set ``grey_p=0.66`` for that);
  6. ``RandomGaussianBlur`` with probability ``blur_p`` (0.5), σ uniform in ``blur_sigma``
     (0.1–2.0 px at the default 168 px view; scaled by :meth:`Exemplar.rescale`), kernel
     ``2·ceil(3σ_max) + 1`` px (capped by the view size).

  Then the views are clamped to [0, 1] and the task's ``input_mode`` is applied
  (``"lab_gray"``: the paper's harmonization, Lab L replicated three times).
* **View size.** Views are batched, so they share one size: ``view_size`` (default
  ``image_size · 3 // 4``, 168 px for 224 px crops). With the default scale range a view covers on
  average ``E[√s] ≈ 0.78`` of the crop's side (≈ 174 px of a 224 px crop), so 168 px keeps about
  the native resolution of an average view while costing ``(3/4)² ≈ 0.56`` of a full-size
  trunk pass per view.
* **Batch composition.** A step needs at least two images (otherwise there is no negative):
  ``batch_size >= 2`` is enforced, and :meth:`Exemplar.loss` raises a ``ValueError`` on a
  one-image batch (e.g. a last validation batch with a single image: choose the number of
  validation samples so that it does not leave one image over).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import kornia.augmentation as KA
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mtssl_lightning.data.batch import TaskBatch
from mtssl_lightning.tasks import pictures as draw
from mtssl_lightning.tasks.base import InputMode, Task, TaskSampler
from mtssl_lightning.tasks.metrics import HitRate

Mining = Literal["semi_hard", "batch_hard"]

__all__ = [
    "Exemplar",
    "ExemplarBatch",
    "ExemplarHead",
    "ExemplarSampler",
    "ViewRetrievalAccuracy",
    "pairwise_distances",
    "triplet_loss",
]


# --------------------------------------------------------------------------------------------
# distances and the triplet loss (pure functions)
# --------------------------------------------------------------------------------------------


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """Euclidean distances between all rows: ``(N, D)`` -> ``(N, N)``, ``d[i, j] = ||x_i - x_j||₂``.

    Computed from the Gram matrix, ``d²[i, j] = |x_i|² + |x_j|² - 2 x_i·x_j`` (memory ``N²``, not
    ``N² D``), in at least float32. Numerically safe: ``d²`` is clamped at 0 before the square
    root (rounding can make it slightly negative), the result is exactly symmetric, the diagonal
    is exactly 0, and entries with ``d² = 0`` get distance 0 with zero gradient (the square
    root's derivative is infinite there), so gradients are always finite.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    x = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    squared = x.square().sum(1)
    gram = x @ x.T
    gram = 0.5 * (gram + gram.T)  # a matmul is not exactly symmetric; d(i, j) == d(j, i) exactly
    d2 = (squared[:, None] + squared[None, :] - 2.0 * gram).clamp_min(0.0)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d2 = d2.masked_fill(eye, 0.0)
    zero = d2 == 0.0
    return torch.sqrt(d2.masked_fill(zero, 1.0)).masked_fill(zero, 0.0)


def _triplet_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(positive, negative)`` boolean ``(N, N)`` masks: same label and ``a != p``; different label."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,), got shape {tuple(labels.shape)}")
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    # one host sync per call, for an early, readable error instead of a NaN loss
    if not bool(positive.any()):
        raise ValueError(
            "triplet_loss: the batch has no positive pair (no two embeddings share a label); "
            "exemplar needs >= 2 views per image"
        )
    if not bool(negative.any()):
        raise ValueError(
            "triplet_loss: the batch has no negative (all embeddings share one label); "
            "exemplar needs >= 2 images per batch"
        )
    return positive, negative


def triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.5, mining: Mining = "semi_hard") -> Tensor:
    """Triplet loss with in-batch mining, on Euclidean (not squared) distances ``d``.

    Args:
        embeddings: ``(N, D)`` embeddings (L2-normalised by the exemplar head, not required here).
        labels: ``(N,)`` integer label of each embedding (the image a view came from).
        margin: the margin ``m``.
        mining: how triplets are chosen.

    ``mining="semi_hard"`` (FaceNet, Schroff et al. 2015; the same rule as TensorFlow-Addons'
    ``triplet_semihard_loss`` except that ``d`` is the Euclidean distance, not its square):
    for every anchor-positive pair ``(a, p)`` with ``a != p`` and ``label[a] = label[p]``, the
    negative is the ``n`` with ``label[n] != label[a]`` and the **smallest** ``d(a, n)`` among those
    with ``d(a, n) > d(a, p)`` (strictly); if there is no such ``n``, the negative with the
    **largest** ``d(a, n)``. The loss is the mean over all anchor-positive pairs of
    ``max(0, d(a, p) - d(a, n) + m)``.

    ``mining="batch_hard"`` (Hermans et al. 2017): for every anchor ``a`` that has a positive,
    ``d_ap = max d(a, p)`` over its positives and ``d_an = min d(a, n)`` over its negatives; the loss
    is the mean over those anchors of ``max(0, d_ap - d_an + m)``.

    Fully vectorised (``O(N²)`` memory; semi-hard negatives are found with a sort and a
    ``searchsorted`` per anchor). Raises ``ValueError`` if the batch has no positive pair or no
    negative. Returns a scalar in float32 (or float64 for float64 input).
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"triplet_loss: embeddings must be (N, D) and labels (N,), got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    positive, negative = _triplet_masks(labels.to(embeddings.device))
    d = pairwise_distances(embeddings)
    if mining == "batch_hard":
        hardest_positive = d.masked_fill(~positive, float("-inf")).amax(1)
        hardest_negative = d.masked_fill(~negative, float("inf")).amin(1)
        valid = positive.any(1) & negative.any(1)
        per_anchor = F.relu(hardest_positive - hardest_negative + margin)
        return per_anchor[valid].mean()
    if mining != "semi_hard":
        raise ValueError(f"triplet_loss: mining must be 'semi_hard' or 'batch_hard', got {mining!r}")
    n = d.shape[0]
    # per anchor, its negatives' distances in ascending order; non-negatives (inf) go last
    negative_sorted = d.masked_fill(~negative, float("inf")).sort(dim=1).values  # (N, N)
    count = negative.sum(1)  # (N,) negatives per anchor
    # first negative strictly farther than the positive: index of the first sorted value > d(a, p)
    first_farther = torch.searchsorted(negative_sorted, d.contiguous(), right=True)  # (N, N) over (a, p)
    has_semi_hard = first_farther < count[:, None]
    semi_hard = negative_sorted.gather(1, first_farther.clamp_max(n - 1))
    farthest = negative_sorted.gather(1, (count - 1).clamp_min(0)[:, None]).expand(-1, n)
    d_an = torch.where(has_semi_hard, semi_hard, farthest)
    per_pair = F.relu(d - d_an + margin)  # inf only off the positive pairs, never selected
    return per_pair[positive].mean()


# --------------------------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------------------------


class ViewRetrievalAccuracy(HitRate):
    """Fraction of views whose nearest *other* view (Euclidean, within one ``update``) is of the same image.

    ``update(embeddings (N, D), labels (N,))``: for each view ``i`` the nearest view
    ``j = argmin_{j != i} d(i, j)`` is a hit if ``labels[j] == labels[i]``; batches with fewer than
    two views add nothing. Hits and counts are summed over updates and processes;
    ``compute() = hits / total``. Chance level with ``V`` views of each of ``B`` images per
    update is ``(V - 1) / (B·V - 1)`` (e.g. 7/255 ≈ 0.027 for B = 32, V = 8).
    """

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.shape[0] < 2:
            return
        d = pairwise_distances(embeddings.detach())
        d = d.fill_diagonal_(float("inf"))
        nearest = d.argmin(1)
        labels = labels.to(embeddings.device)
        self.count(labels[nearest] == labels)


# --------------------------------------------------------------------------------------------
# batch and head
# --------------------------------------------------------------------------------------------


@dataclass
class ExemplarBatch(TaskBatch):
    """Augmented views of an exemplar step.

    Attributes:
        inputs: ``(B·V, 3, s, s)`` float views in [0, 1] (after ``input_mode``), the ``V`` views of
            image 0 first, then those of image 1, …
        labels: ``(B·V,)`` int64 image of each view, ``arange(B).repeat_interleave(V)``.
        views: ``V``, views per image.
    """

    labels: Tensor
    views: int


class ExemplarHead(nn.Module):
    """Embedding head: ``(N, C, h, w)`` -> global average pool -> Linear(C, hidden) -> BN -> ReLU
    -> Linear(hidden, D) -> L2 normalisation -> ``(N, D)`` unit vectors."""

    def __init__(self, channels: int, hidden: int = 512, embedding_dim: int = 128) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.project = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, embedding_dim),
        )

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.project(self.pool(features)), dim=1)


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


class ExemplarSampler(TaskSampler):
    """``views`` augmented views of every image of a batch, made on the device by one Kornia pipeline.

    Args:
        batch_size: images per step (>= 2); the trunk sees ``batch_size × views`` views.
        image_size: side of the square crops the DataModule delivers.
        input_mode: ``"rgb"``, or ``"lab_gray"`` (the paper's harmonization, applied to the views
            after augmentation).
        views: views per image (>= 2; 8 in the re-implementation the spec quotes).
        view_size: side of every view in pixels; ``None`` means ``image_size * 3 // 4`` (168 px
            for 224 px crops; see the module docstring).
        crop_scale: range of the crop's area as a fraction of the image (RandomResizedCrop).
        crop_ratio: range of the crop's aspect ratio (width / height).
        rotation: maximum rotation in degrees (uniform in ``±rotation``; 0 disables it).
        flip_p: probability of a horizontal flip.
        brightness, contrast, saturation, hue: ColorJitter strengths (torchvision semantics:
            factors uniform in ``[1 - x, 1 + x]``, hue shift uniform in ``±hue`` of a full turn).
        jitter_p: probability that ColorJitter is applied to a view.
        grey_p: probability that a view is made grey (luminance replicated to 3 channels).
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's σ in pixels of the view.
    """

    def __init__(
        self,
        batch_size: int = 32,
        image_size: int = 224,
        input_mode: InputMode = "rgb",
        views: int = 8,
        view_size: int | None = None,
        crop_scale: tuple[float, float] = (0.25, 1.0),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        rotation: float = 20.0,
        flip_p: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        jitter_p: float = 0.8,
        grey_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        super().__init__(batch_size=batch_size, image_size=image_size, input_mode=input_mode)
        name = self.task_name
        if batch_size < 2:
            raise ValueError(f"{name}: `batch_size` must be >= 2 (other images are the negatives), got {batch_size}")
        if views < 2:
            raise ValueError(f"{name}: `views` must be >= 2 (two views of an image make a positive pair), got {views}")
        if view_size is None:
            view_size = max(1, image_size * 3 // 4)
        if view_size < 1:
            raise ValueError(f"{name}: `view_size` must be >= 1, got {view_size}")
        low, high = crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"{name}: `crop_scale` must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"{name}: `crop_ratio` must satisfy 0 < low <= high, got {crop_ratio}")
        for key, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grey_p", grey_p), ("blur_p", blur_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: `{key}` must be a probability in [0, 1], got {p}")
        if min(brightness, contrast, saturation, rotation) < 0 or not 0.0 <= hue <= 0.5:
            raise ValueError(f"{name}: jitter strengths and `rotation` must be >= 0 and `hue` in [0, 0.5]")
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"{name}: `blur_sigma` must satisfy 0 < low <= high, got {blur_sigma}")
        self.views, self.view_size = views, view_size
        self.crop_scale = (float(low), float(high))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.rotation, self.flip_p = float(rotation), flip_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.jitter_p, self.grey_p = jitter_p, grey_p
        self.blur_p, self.blur_sigma = blur_p, (float(blur_sigma[0]), float(blur_sigma[1]))
        self.augment = self._make_augmentation()
        self._device = torch.device("cpu")

    @property
    def blur_kernel_size(self) -> int:
        """Odd Gaussian-blur kernel side: ``2·ceil(3σ_max) + 1``, capped so its radius fits in the view."""
        size = 2 * math.ceil(3.0 * self.blur_sigma[1]) + 1
        limit = self.view_size if self.view_size % 2 == 1 else self.view_size - 1
        return max(1, min(size, limit))

    def _make_augmentation(self) -> KA.AugmentationSequential:
        """The augmentation pipeline (see the module docstring), one random draw per view."""
        ops: list[nn.Module] = [
            KA.RandomResizedCrop(
                (self.view_size, self.view_size), scale=self.crop_scale, ratio=self.crop_ratio, p=1.0
            ),
        ]
        if self.rotation > 0:
            ops.append(KA.RandomRotation(degrees=self.rotation, p=1.0))
        ops += [
            KA.RandomHorizontalFlip(p=self.flip_p),
            KA.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue, p=self.jitter_p),
            KA.RandomGrayscale(p=self.grey_p),
        ]
        if self.blur_kernel_size >= 3:
            k = self.blur_kernel_size
            ops.append(KA.RandomGaussianBlur((k, k), self.blur_sigma, p=self.blur_p))
        augment = KA.AugmentationSequential(*ops)
        # Kornia keeps sampling ranges in buffers (e.g. the rotation's degrees); they follow the
        # config, so keep them out of checkpoints (a checkpoint must not override the config)
        for module in augment.modules():
            for key in list(module._buffers):
                buffer = module._buffers.pop(key)
                module.register_buffer(key, buffer, persistent=False)
        return augment

    def rescale(self, factor: float) -> None:
        """Scale the crop size, the view size and the blur σ together (``model.pixel_scale``)."""
        super().rescale(factor)
        self.view_size = max(1, round(self.view_size * factor))
        self.blur_sigma = (self.blur_sigma[0] * factor, self.blur_sigma[1] * factor)
        self.augment = self._make_augmentation()
        self._device = torch.device("cpu")

    # ---- views ------------------------------------------------------------------------

    @torch.no_grad()
    def build(self, images: Tensor, generator: torch.Generator | None = None) -> ExemplarBatch:
        """``V`` augmented views of each of the ``(B, 3, S, S)`` images (float in [0, 1], any device).

        Returns views ``(B·V, 3, view_size, view_size)`` in [0, 1] and their image labels
        ``(B·V,)``. Works for any ``B >= 1`` (a one-image batch has no negatives: the task's loss
        rejects it). Kornia draws the augmentation parameters from torch's global RNG (it takes no
        generator).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.task_name}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if self._device != images.device:  # Kornia keeps its sampling ranges in buffers: move them once
            self.augment.to(images.device)
            self._device = images.device
        batch = images.shape[0]
        repeated = images.float().repeat_interleave(self.views, dim=0)
        views = self.harmonize(self.augment(repeated).clamp_(0.0, 1.0)).contiguous()
        labels = torch.arange(batch, device=images.device).repeat_interleave(self.views)
        return ExemplarBatch(inputs=views, labels=labels, views=self.views)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(views={self.views}, view_size={self.view_size}, image_size={self.image_size}, "
            f"input_mode={self.input_mode!r})"
        )



class Exemplar(Task):
    """Exemplar: augmented views of each image, pulled together by a triplet loss.

    Args:
        loss_weight: weight of this task's loss in the "sum of weighted losses" mode.
        embedding_dim: dimension ``D`` of the L2-normalised embedding.
        hidden: width of the head's hidden layer.
        margin: triplet margin on Euclidean distances between unit vectors (distances lie in [0, 2]).
        mining: ``"semi_hard"`` or ``"batch_hard"`` triplet mining (see :func:`triplet_loss`).
        **sampling: the sampling settings (views and augmentations), arguments of
            :class:`ExemplarSampler` (``batch_size``, ``image_size``, ``input_mode``, ``views``,
            ``view_size``, ``crop_scale`` …); the sampler is ``task.sampler``.
    """

    sampler: ExemplarSampler

    def __init__(
        self,
        loss_weight: float = 1.0,
        embedding_dim: int = 128,
        hidden: int = 512,
        margin: float = 0.5,
        mining: Mining = "semi_hard",
        **sampling: Any,
    ) -> None:
        super().__init__(ExemplarSampler(**sampling), loss_weight)
        name = type(self).__name__
        if embedding_dim < 1 or hidden < 1:
            raise ValueError(f"{name}: `embedding_dim` and `hidden` must be >= 1, got {embedding_dim}, {hidden}")
        if margin < 0:
            raise ValueError(f"{name}: `margin` must be >= 0, got {margin}")
        if mining not in ("semi_hard", "batch_hard"):
            raise ValueError(f"{name}: `mining` must be 'semi_hard' or 'batch_hard', got {mining!r}")
        self.embedding_dim, self.hidden = embedding_dim, hidden
        self.margin, self.mining = margin, mining

    # ---- head ---------------------------------------------------------------------------

    def build_head(self, channels: int, stride: int) -> nn.Module:
        """An :class:`ExemplarHead` (global pooling, so ``stride`` does not matter)."""
        return ExemplarHead(channels, self.hidden, self.embedding_dim)

    def forward(self, features: Tensor, batch: TaskBatch) -> Tensor:
        """``(B·V, C, h, w)`` features of the views -> ``(B·V, D)`` unit embeddings."""
        assert self.head is not None, "call attach() before forward()"
        return self.head(features)

    # ---- loss and metrics --------------------------------------------------------------

    def loss(self, prediction: Tensor, batch: TaskBatch) -> Tensor:
        """:func:`triplet_loss` of the ``(B·V, D)`` embeddings against the image labels."""
        assert isinstance(batch, ExemplarBatch)
        if batch.labels.numel() <= batch.views:
            raise ValueError(
                f"{type(self).__name__}: a batch with a single image has no negatives for the triplet "
                "loss; every batch needs >= 2 images (for validation, choose the number of validation "
                "samples so that no batch is left with one image)"
            )
        return triplet_loss(prediction.float(), batch.labels, self.margin, self.mining)

    def make_metrics(self) -> MetricCollection:
        """``retrieval_acc`` (:class:`ViewRetrievalAccuracy`; chance ``(V-1)/(B·V-1)``)."""
        return MetricCollection({"retrieval_acc": ViewRetrievalAccuracy()})

    def metric_inputs(self, prediction: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(embeddings (B·V, D), labels (B·V,))``."""
        assert isinstance(batch, ExemplarBatch)
        return prediction.detach(), batch.labels

    # ---- pictures ----------------------------------------------------------------------

    @torch.no_grad()
    def pictures(self, batch: TaskBatch, prediction: Tensor | None = None, max_items: int = 4) -> dict[str, Tensor]:
        """``"views"``: one row per image (the first ``max_items``), its ``V`` views as the trunk sees them.

        With a ``prediction`` (``(B·V, D)`` embeddings) every view gets a frame: green when its
        nearest other view of the *whole* batch (Euclidean, as :class:`ViewRetrievalAccuracy`) is a
        view of the same image, red otherwise. Without, the views are framed in the background grey.
        """
        assert isinstance(batch, ExemplarBatch)
        views = batch.views
        count = min(max_items, batch.inputs.shape[0] // views)
        shown = draw.as_rgb(batch.inputs[: count * views])
        device = shown.device
        colour = torch.full((count * views, 3), draw.BACKGROUND, device=device)
        if prediction is not None:
            distances = pairwise_distances(prediction.detach()).fill_diagonal_(float("inf"))
            labels = batch.labels.to(device)
            hit = (labels[distances.argmin(1)] == labels)[: count * views, None]
            colour = torch.where(hit, torch.tensor(draw.GREEN, device=device), torch.tensor(draw.RED, device=device))
        framed = draw.outline(shown, colour, max(1, shown.shape[-1] // 32))
        return {"views": draw.grid(framed.view(count, views, *framed.shape[1:])).cpu()}
