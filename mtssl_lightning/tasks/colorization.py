"""Colorization (Zhang, Isola, Efros 2016) as a self-supervised task.

The trunk sees only the lightness (harmonized "lab_gray" input: Lab L / 100 replicated three
times) and the head predicts, at 1/4 of the input resolution, a distribution over the quantized
in-gamut ab bins. Targets are soft-encoded (Gaussian weights on the 5 nearest bins, σ = 5), the
loss is a per-pixel cross-entropy, optionally re-weighted by the inverse of the (smoothed) bin
prior ("class rebalancing", λ = 0.5), and the annealed mean (T = 0.38) turns a distribution back
into one ab value for pictures and for the ab-error AuC metric.

Deviations from Zhang et al. / assumptions (all config options):

* **Bins.** Zhang et al. keep Q = 313 bins; we derive the in-gamut bins from the sRGB gamut
  ourselves (see :func:`ab_gamut_bins`) and get **Q = 229** for grid 10 with the default
  "centre in gamut" rule (every bin centre is a real sRGB colour), or Q = 262 with the "cell"
  rule (cells that contain an sRGB colour; same extent as Zhang et al.'s bins: a ∈ [-90, 100],
  b ∈ [-110, 90]). We could not reproduce 313 from the sRGB gamut; their released bin list is
  not bundled here.
* **Prior.** The bin prior for rebalancing is estimated *online* from the training batches
  (a persistent buffer, saved in checkpoints), not precomputed over ImageNet. Until
  ``prior_warmup_pixels`` pixels have been counted the weights are uniform (plain
  cross-entropy).
* **σ of the prior smoothing** is taken in ab units (σ = 5, i.e. half a bin).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

import kornia.color
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.aggregation import MeanMetric

from mtssl_lightning.data.batch import TaskBatch
from mtssl_lightning.data.color import lab_to_rgb, rgb_to_lab
from mtssl_lightning.tasks import pictures as draw
from mtssl_lightning.tasks.base import InputMode, Task, TaskSampler
from mtssl_lightning.tasks.heads import DenseHead
from mtssl_lightning.tasks.metrics import HitRate

GamutRule = Literal["cell", "centre"]

__all__ = [
    "AbErrorAuC",
    "Colorization",
    "ColorizationBatch",
    "ColorizationHead",
    "ColorizationSampler",
    "SoftCrossEntropy",
    "TopBinAccuracy",
    "ab_gamut_bins",
    "annealed_mean",
    "candidate_table",
    "densify",
    "rebalance_weights",
    "smooth_prior",
    "soft_encode",
    "soft_encode_sparse",
]


# --------------------------------------------------------------------------------------------
# bins
# --------------------------------------------------------------------------------------------


def _rgb_cube_surface(steps: int) -> Tensor:
    """The six faces of the sRGB cube sampled on a ``steps × steps`` lattice: ``(6, 3, steps, steps)`` float64."""
    g = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    u, v = torch.meshgrid(g, g, indexing="ij")
    faces = []
    for axis in range(3):
        others = [i for i in range(3) if i != axis]
        for value in (0.0, 1.0):
            channels: list[Tensor] = [u, u, u]
            channels[axis] = torch.full_like(u, value)
            channels[others[0]], channels[others[1]] = u, v
            faces.append(torch.stack(channels))
    return torch.stack(faces)


@functools.lru_cache(maxsize=8)
def _gamut_bins_cached(grid: int, rule: GamutRule) -> Tensor:
    if rule == "cell":
        # The ab projection of the sRGB gamut solid equals the projection of its boundary (every
        # vertical L-line through the solid meets the boundary), and the boundary is the image of
        # the cube's faces; on a 512² lattice per face neighbouring samples are < 1 ab unit apart.
        cells = []
        for face in _rgb_cube_surface(512):  # one face at a time keeps memory small
            ab = rgb_to_lab(face)[1:].reshape(2, -1)
            # nearest grid centre (ties at the cell edge go up, a measure-zero choice)
            cells.append(torch.unique(torch.floor(ab / grid + 0.5).to(torch.int64).T, dim=0))
        centres = torch.unique(torch.cat(cells), dim=0).to(torch.float64) * grid
    elif rule == "centre":
        # A centre is kept if some L in a fine sweep of (0, 100) gives an unclipped sRGB colour.
        half = math.ceil(130 / grid)
        c = torch.arange(-half, half + 1, dtype=torch.float64) * grid
        a, b = torch.meshgrid(c, c, indexing="ij")
        lightness = torch.linspace(0.0, 100.0, 2001, dtype=torch.float64)[1:-1]
        n_l, n_ab = lightness.numel(), a.numel()
        lab = torch.stack([
            lightness[:, None].expand(n_l, n_ab),
            a.reshape(1, -1).expand(n_l, n_ab),
            b.reshape(1, -1).expand(n_l, n_ab),
        ])
        # Lab -> linear XYZ -> sRGB without clipping (kornia's lab_to_rgb(clip=False))
        rgb = kornia.color.lab_to_rgb(lab, clip=False)
        keep = ((rgb >= 0.0) & (rgb <= 1.0)).all(0).any(0)
        centres = torch.stack([a.reshape(-1)[keep], b.reshape(-1)[keep]], 1)
    else:
        raise ValueError(f"gamut rule must be 'cell' or 'centre', got {rule!r}")
    # lexicographic (a, b) order so that bin indices are stable
    order = torch.argsort(centres[:, 0] * 10_000 + centres[:, 1])
    return centres[order].to(torch.float32)


def ab_gamut_bins(grid: int = 10, rule: GamutRule = "centre") -> Tensor:
    """Centres of the quantized ab bins that hold sRGB colours: ``(Q, 2)`` float32 (a, b).

    The ab plane is cut into square cells of side ``grid`` centred on multiples of ``grid``
    (a colour belongs to the bin whose centre is nearest). Derivation, computed here from the
    sRGB (D65) gamut with Kornia's Lab conversion, no external list:

    * ``rule="centre"`` (default): a bin is kept if its **centre** (a, b) is in gamut, i.e. some
      L in a sweep of 1999 values in (0, 100) converts to sRGB inside [0, 1] without clipping.
      Grid 10 gives **Q = 229** (the narrowest, (20, 80), is in gamut only for
      L ∈ [76.56, 76.66]). Every centre is then a real colour (decoded pictures never ask for
      an impossible ab); on the sample photos the farthest pixel is 7.10 ab units from a
      centre (vs. 7.06 with "cell").
    * ``rule="cell"``: a bin is kept if **some sRGB colour quantizes into it**. We map
      a 512 × 512 lattice on each face of the RGB cube to Lab (the ab projection of the gamut
      solid equals the projection of its surface) and collect the cells hit. (One bin,
      (20, -80), is grazed by the gamut only 0.12 ab units deep; a coarser 256² lattice misses
      it, 512² and 1024² agree on it.) Grid 10 gives
      **Q = 262**, with a ∈ [-90, 100] and b ∈ [-110, 90] — the same extent as Zhang et al.'s
      313 bins (whose exact selection we could not reproduce from the sRGB gamut). This rule
      guarantees that every in-gamut ab is within ``grid · √2 / 2`` of a centre, but 33 of its
      centres are themselves out of gamut.

    The result is cached (pure function of its arguments); a fresh copy is returned.
    """
    if grid <= 0:
        raise ValueError(f"`grid` must be positive, got {grid}")
    return _gamut_bins_cached(int(grid), rule).clone()


# --------------------------------------------------------------------------------------------
# encoding / decoding
# --------------------------------------------------------------------------------------------


#: ab extent covered by the candidate table (sRGB colours have |a|, |b| < 128)
_TABLE_EXTENT = 128


def _table_side(resolution: float) -> int:
    """Cells per side of the candidate table's ``[-128, 128]²`` grid at ``resolution`` ab units."""
    return int(2 * _TABLE_EXTENT / resolution) + 1


@functools.lru_cache(maxsize=8)
def _candidate_table_cached(centres_key: tuple[tuple[float, float], ...], neighbours: int, resolution: float) -> Tensor:
    centres = torch.tensor(centres_key, dtype=torch.float64)
    n = _table_side(resolution)
    g = torch.arange(n, dtype=torch.float64) * resolution - _TABLE_EXTENT
    a, b = torch.meshgrid(g, g, indexing="ij")
    cells = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    dist = torch.cdist(cells, centres)  # (n², Q)
    kth = dist.kthvalue(neighbours, dim=1, keepdim=True).values
    # any point of a cell is within δ = resolution·√2/2 of the cell centre p, so its k nearest
    # bins are among those with d(p, c) ≤ d_k(p) + 2δ (triangle inequality both ways)
    count = int((dist <= kth + resolution * math.sqrt(2.0) + 1e-6).sum(1).max())
    return torch.topk(dist, count, dim=1, largest=False).indices


def candidate_table(centres: Tensor, neighbours: int = 5, resolution: float = 2.0) -> Tensor:
    """Lookup table of the bins that can be among a pixel's ``neighbours`` nearest: ``(n², M)`` int64.

    The ab square ``[-128, 128]²`` is cut into ``n × n`` cells of side ``resolution`` (``n = 129``
    at the default 2 ab units). Row ``i · n + j`` lists, nearest first, the ``M`` bins nearest to
    the centre ``p`` of cell ``(i, j)``, where ``M`` is the smallest count that contains, for
    every cell, all bins with ``d(p, c) ≤ d_k(p) + resolution·√2``: by the triangle inequality
    these include the ``k`` nearest bins of any point of the cell, so encoding with the table is
    exact (``M = 12`` for the default 229 bins and k = 5). Cached per bin set.
    """
    key = tuple((float(a), float(b)) for a, b in centres.tolist())
    return _candidate_table_cached(key, int(neighbours), float(resolution)).clone()


def soft_encode_sparse(
    ab: Tensor,
    centres: Tensor,
    neighbours: int = 5,
    sigma: float = 5.0,
    candidates: Tensor | None = None,
    resolution: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Soft encoding as bin indices and weights: ``(B, 2, h, w)`` -> two ``(B, K, h, w)`` tensors.

    Each pixel gets Gaussian weights ``exp(-d² / 2σ²)`` on its ``K = neighbours`` nearest bin
    centres (``d`` the Euclidean ab distance), normalised to sum to 1. Returns ``bins`` (int64,
    nearest first, so ``bins[:, 0]`` is the top bin) and ``weights`` (float32).

    With ``candidates`` (:func:`candidate_table` of the same ``centres``, ``neighbours`` and
    ``resolution``) each pixel compares its distance to only ``M`` (12) candidate bins instead of
    all Q; the result is the same (exact for ab in ``[-128, 128]²``, which holds every sRGB colour;
    values outside are clamped to the border cells for the lookup). Without, all Q bins are compared.
    """
    b, _, h, w = ab.shape
    pixels = ab.permute(0, 2, 3, 1).reshape(-1, 2).to(torch.float32)
    c = centres.to(device=ab.device, dtype=torch.float32)
    if candidates is None:
        d2, idx = torch.topk(torch.cdist(pixels, c).square(), neighbours, dim=1, largest=False)
    else:
        n = _table_side(resolution)
        cell = torch.round((pixels + _TABLE_EXTENT) / resolution).clamp_(0, n - 1).to(torch.int64)
        cand = candidates.to(ab.device)[cell[:, 0] * n + cell[:, 1]]  # (P, M)
        cand_d2 = (c[cand] - pixels[:, None]).square().sum(-1)
        d2, pos = torch.topk(cand_d2, neighbours, dim=1, largest=False)
        idx = cand.gather(1, pos)
    # subtracting the nearest distance keeps exp() from underflowing far from the gamut
    weights = torch.exp(-(d2 - d2[:, :1]) / (2.0 * sigma**2))
    weights = weights / weights.sum(1, keepdim=True)
    to_map = lambda t: t.view(b, h, w, neighbours).permute(0, 3, 1, 2).contiguous()
    return to_map(idx), to_map(weights)


def densify(bins: Tensor, weights: Tensor, num_bins: int) -> Tensor:
    """Sparse soft targets ``(B, K, h, w)`` bins and weights -> dense ``(B, Q, h, w)`` distributions."""
    b, _, h, w = bins.shape
    out = torch.zeros(b, num_bins, h, w, device=weights.device, dtype=weights.dtype)
    return out.scatter_(1, bins, weights)


def soft_encode(ab: Tensor, centres: Tensor, neighbours: int = 5, sigma: float = 5.0) -> Tensor:
    """Dense soft encoding, the reference: ``(B, 2, h, w)`` -> ``(B, Q, h, w)``.

    Brute force over all Q bins (:func:`soft_encode_sparse` without a table), scattered into a
    dense distribution per pixel; zero outside the ``neighbours`` nearest bins.
    """
    bins, weights = soft_encode_sparse(ab, centres, neighbours, sigma)
    return densify(bins, weights, centres.shape[0])


def annealed_mean(logits: Tensor, centres: Tensor, temperature: float = 0.38) -> Tensor:
    """Annealed mean of the predicted distributions: ``(B, Q, h, w)`` logits -> ``(B, 2, h, w)`` ab.

    ``f_T(p) = softmax(log p / T)``; with ``p = softmax(logits)`` this is ``softmax(logits / T)``
    (the log-normaliser cancels). The ab value is the ``f_T``-weighted mean of the centres.
    T = 1 is the plain mean, T → 0 the mode.
    """
    # float32 whatever the autocast state: an autocast region would run the einsum in bf16
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float() / temperature, dim=1)
        return torch.einsum("bqhw,qc->bchw", probs, centres.to(device=logits.device, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# class rebalancing
# --------------------------------------------------------------------------------------------


def smooth_prior(prior: Tensor, centres: Tensor, sigma: float = 5.0) -> Tensor:
    """Smooth a bin distribution with a Gaussian over the ab plane: ``(Q,)`` -> ``(Q,)``, sums to 1.

    ``p̃_i ∝ Σ_j exp(-|c_i - c_j|² / 2σ²) p_j`` — the full-plane convolution restricted to the
    in-gamut bins and renormalised (mass smoothed out of the gamut is dropped).
    """
    c = centres.to(device=prior.device, dtype=torch.float64)
    kernel = torch.exp(-torch.cdist(c, c).square() / (2.0 * sigma**2))
    smoothed = kernel @ prior.to(torch.float64)
    return (smoothed / smoothed.sum()).to(prior.dtype)


def rebalance_weights(smoothed_prior: Tensor, lam: float = 0.5) -> Tensor:
    """Zhang et al. eq. 4: ``w ∝ ((1 - λ) p̃ + λ / Q)^-1``, normalised so that ``Σ_q p̃_q w_q = 1``.

    Args:
        smoothed_prior: ``(Q,)`` smoothed bin prior p̃ (sums to 1).
        lam: λ, the weight of the uniform distribution in the mixture.
    """
    q = smoothed_prior.numel()
    w = 1.0 / ((1.0 - lam) * smoothed_prior + lam / q)
    return w / (smoothed_prior * w).sum()


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


class TopBinAccuracy(HitRate):
    """Fraction of pixels whose most likely predicted bin is the soft target's most likely bin.

    ``update(logits, target_bin, pred_ab, true_ab, …)`` (the colorization metric signature; only
    the first two are used): logits ``(B, Q, h, w)``, target_bin ``(B, h, w)`` int64 (the nearest
    bin, i.e. the soft target's largest weight).
    """

    def update(self, logits: Tensor, target_bin: Tensor, *_: Any) -> None:
        self.count(logits.argmax(1) == target_bin)


class SoftCrossEntropy(MeanMetric):
    """The soft-target cross-entropy per pixel, ``-Σ_k z_k log ẑ[bin_k]``, averaged over pixels;
    unweighted, or (``weighted=True``) with the loss's rebalancing weight of each pixel's top bin.

    The task's loss weights each pixel by the rebalancing weight of its top bin, and those weights
    follow the running prior: the same predictions get a different weighted loss as the prior
    fills in, so the weighted validation loss is not a "lower is better" curve over a run; the
    unweighted one is. ``update(logits, target_bin, pred_ab, true_ab, target_bins (B, K, h, w),
    target_weights, prior_log_probs (Q,), class_weights (Q,))`` (:meth:`Colorization.metric_inputs`).
    """

    higher_is_better = False

    def __init__(self, weighted: bool = False, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)  # no NaN check: it would be a host sync per update
        self.weighted = weighted
        self.set_dtype(torch.float64)

    def update(  # type: ignore[override]
        self, logits: Tensor, target_bin: Tensor, pred_ab: Tensor, true_ab: Tensor, target_bins: Tensor, target_weights: Tensor,
        prior_log_probs: Tensor, class_weights: Tensor,
    ) -> None:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            ce = -(target_weights * self.target_log_probs(logits, target_bins, prior_log_probs)).sum(1)
            if self.weighted:
                ce = class_weights.float()[target_bin] * ce
            super().update(ce.reshape(-1))

    def target_log_probs(self, logits: Tensor, target_bins: Tensor, prior_log_probs: Tensor) -> Tensor:
        """``(B, K, h, w)`` float32 log-probabilities of the K target bins under the predictions
        scored: the net's."""
        return torch.log_softmax(logits.float(), dim=1).gather(1, target_bins)


class PriorCrossEntropy(SoftCrossEntropy):
    """The no-learning reference of :class:`SoftCrossEntropy`: the same cross-entropy (unweighted,
    or weighted like the loss) for a predictor that ignores the image and always outputs the
    training data's smoothed colour prior (the best image-independent guess)."""

    def target_log_probs(self, logits: Tensor, target_bins: Tensor, prior_log_probs: Tensor) -> Tensor:
        """The predictions scored: the prior, at every pixel (looked up from the ``(Q,)`` vector
        instead of a ``(B, Q, h, w)`` copy of it)."""
        return torch.log_softmax(prior_log_probs.float(), dim=0)[target_bins]


class AbErrorAuC(Metric):
    """Zhang et al.'s "AuC": area under the curve of the fraction of pixels with ab error ≤ t.

    Per pixel, ``e = ||pred_ab - true_ab||₂``; for each integer threshold ``t = 0 … max_threshold``
    the fraction ``F(t)`` of pixels with ``e ≤ t`` is computed, and the AuC is the mean of
    ``F(t)`` over the ``max_threshold + 1`` thresholds (so it lies in [0, 1]). Edge conventions:
    ``≤`` (a pixel with zero error counts at t = 0), so a perfect prediction gives exactly 1 and a
    constant error ``e ∈ [0, 150]`` gives ``(151 - ceil(e)) / 151``.

    States are per-threshold hit counts and the pixel count, summed across batches and processes.
    ``update(logits, target_bin, pred_ab, true_ab)``: ab maps ``(B, 2, h, w)``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, max_threshold: int = 150, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_threshold = max_threshold
        self.add_state("hits", torch.zeros(max_threshold + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor | None, target_bin: Tensor | None, pred_ab: Tensor, true_ab: Tensor, *_: Any) -> None:
        err = torch.linalg.vector_norm(pred_ab.float() - true_ab.float(), dim=1).reshape(-1)
        # e ≤ t for integer t  <=>  t ≥ ceil(e): histogram of ceil(e), then a cumulative sum
        first = torch.ceil(err).clamp(0, self.max_threshold + 1).to(torch.int64)
        # a fixed-size scatter, not bincount: CUDA's bincount reads the input's maximum on the host
        counts = torch.zeros(self.max_threshold + 2, dtype=torch.float64, device=err.device)
        counts.scatter_add_(0, first, torch.ones_like(first, dtype=torch.float64))
        self.hits += torch.cumsum(counts[: self.max_threshold + 1], 0)
        self.total += float(err.numel())

    def compute(self) -> Tensor:
        return (self.hits / self.total.clamp_min(1.0)).mean().to(torch.float32)


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


@dataclass
class ColorizationBatch(TaskBatch):
    """Inputs and targets of the colorization task.

    Attributes:
        inputs: ``(B, 3, H, W)`` harmonized input, Lab L / 100 replicated three times.
        lightness: ``(B, 1, H, W)`` Lab L in [0, 100] at full resolution (for decoding).
        ab: ``(B, 2, h, w)`` true ab, area-downsampled to the prediction resolution
            ``h = H / output_stride``.
        target_bins: ``(B, K, h, w)`` int64, the ``K`` (5) nearest bins of ``ab``, nearest first.
        target_weights: ``(B, K, h, w)`` float32 soft-encoding weights of ``target_bins`` (sum to 1
            per pixel). Sparse: a dense ``(B, Q, h, w)`` target would be Q / K ≈ 46 times larger.
        num_bins: Q.
    """

    lightness: Tensor
    ab: Tensor
    target_bins: Tensor
    target_weights: Tensor
    num_bins: int

    @property
    def soft_targets(self) -> Tensor:
        """The dense ``(B, Q, h, w)`` soft targets (materialised on each access; for inspection)."""
        return densify(self.target_bins, self.target_weights, self.num_bins)


#: the colorization head is the shared dense head (Q logits at 1/4 of the input)
ColorizationHead = DenseHead


class ColorizationSampler(TaskSampler):
    """Lab lightness inputs and soft-encoded ab targets from a batch of RGB images.

    Args:
        batch_size: images per step for this task.
        image_size: side of the square crops delivered by the DataModule (best a multiple of
            the trunk stride, 16; predictions are at ``image_size // output_stride``).
        input_mode: must be ``"lab_gray"`` (RGB input would reveal the colours to predict).
        grid: ab quantization step (10 in the paper).
        gamut_rule: which bins are "in gamut", see :func:`ab_gamut_bins` (``"centre"``: Q = 229, every centre in gamut; ``"cell"``: Q = 262).
        neighbours: bins per pixel in the soft encoding (5 in the paper).
        sigma: σ of the soft encoding's Gaussian, ab units (5 in the paper).
        output_stride: input pixels per predicted pixel (4 as in Zhang et al.).
    """

    def __init__(
        self,
        batch_size: int = 32,
        image_size: int = 224,
        input_mode: InputMode = "lab_gray",
        crop_area: tuple[float, float] | None = None,
        grid: int = 10,
        gamut_rule: GamutRule = "centre",
        neighbours: int = 5,
        sigma: float = 5.0,
        output_stride: int = 4,
    ) -> None:
        if input_mode != "lab_gray":
            raise ValueError(
                "Colorization: `input_mode` must be 'lab_gray' — with RGB input the trunk would see "
                f"the colours it must predict; got {input_mode!r}"
            )
        super().__init__(batch_size=batch_size, image_size=image_size, input_mode=input_mode, crop_area=crop_area)
        if output_stride < 1:
            raise ValueError(f"Colorization: `output_stride` must be >= 1, got {output_stride}")
        self.grid, self.gamut_rule = grid, gamut_rule
        self.neighbours, self.sigma, self.output_stride = neighbours, sigma, output_stride
        self.centres = ab_gamut_bins(grid, gamut_rule)
        if not 1 <= neighbours <= self.centres.shape[0]:
            raise ValueError(f"Colorization: `neighbours` must be in [1, {self.centres.shape[0]}], got {neighbours}")
        self.num_bins = self.centres.shape[0]
        self.candidates = candidate_table(self.centres, neighbours)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Bin centres and the candidate table on ``device`` (moved once, then kept there)."""
        if self.centres.device != device:
            self.centres, self.candidates = self.centres.to(device), self.candidates.to(device)
        return self.centres, self.candidates

    @torch.no_grad()
    def build(self, images: Tensor, generator: torch.Generator | None = None) -> ColorizationBatch:
        """L input and ab targets from ``(B, 3, H, W)`` RGB in [0, 1] (deterministic: ``generator`` is unused).

        Targets are at ``(H // output_stride, W // output_stride)``; sizes that are not multiples
        of ``output_stride`` (e.g. after ``rescale``) are area-averaged over uneven windows.
        """
        centres, candidates = self._tables(images.device)
        lab = rgb_to_lab(images.float())  # Lab in float32 even under autocast
        lightness = lab[:, :1]
        inputs = (lightness / 100.0).expand(-1, 3, -1, -1).contiguous()
        size = (images.shape[-2] // self.output_stride, images.shape[-1] // self.output_stride)
        ab = F.interpolate(lab[:, 1:], size=size, mode="area")
        bins, weights = soft_encode_sparse(ab, centres, self.neighbours, self.sigma, candidates)
        return ColorizationBatch(
            inputs=inputs, lightness=lightness, ab=ab, target_bins=bins, target_weights=weights, num_bins=self.num_bins
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, grid={self.grid}, bins={self.num_bins}, output_stride={self.output_stride})"


class Colorization(Task):
    """Colorization (Zhang, Isola, Efros 2016): predict quantized ab from L.

    Class rebalancing uses a bin prior estimated **online**: :meth:`observe` counts each training
    pixel's nearest bin (its quantised colour), :meth:`synchronize` adds every rank's counts to the
    persistent float64 buffer ``prior_counts`` (saved in checkpoints; validation batches are not
    counted), and the weights are made from it, smoothed once with the σ = ``prior_sigma`` Gaussian,
    at every loss (Q-sized ops). Until ``prior_warmup_pixels`` target pixels have been counted the
    weights are all 1 (plain cross-entropy), so the first steps never use a noisy prior. Do not use
    "true" half precision (``bf16-true``), which would cast the counts; mixed precision is fine.
    Metrics: ``top_bin_acc``, ``ab_auc`` and ``ce`` (the unweighted soft cross-entropy: the
    weighted loss follows the prior as it fills in, so only ``ce`` reads as better/worse over a run).

    Args:
        loss_weight: weight of this task's loss in the weighted-sum mode.
        rebalance: weight each pixel by the rebalancing weight of its target's top bin.
        rebalance_lambda: λ of the prior/uniform mixture (0.5 in the paper).
        prior_sigma: σ of the Gaussian smoothing of the prior over the ab plane, ab units
            (5 in the paper; the unit is our assumption).
        prior_warmup_pixels: the online prior is used only once this many pixels (at the
            prediction resolution) have been counted; before that the weights are uniform.
        temperature: annealed-mean temperature T (0.38 in the paper).
        head_channels: width of the head's hidden convolutions.
        **sampling: the sampling settings, arguments of :class:`ColorizationSampler` (``batch_size``,
            ``image_size``, ``input_mode``, ``grid``, ``gamut_rule``, ``neighbours``, ``sigma``,
            ``output_stride``); the sampler is ``task.sampler``.
    """

    sampler: ColorizationSampler

    def __init__(
        self,
        loss_weight: float = 1.0,
        rebalance: bool = True,
        rebalance_lambda: float = 0.5,
        prior_sigma: float = 5.0,
        prior_warmup_pixels: int = 100_000,
        temperature: float = 0.38,
        head_channels: int = 256,
        **sampling: Any,
    ) -> None:
        sampler = ColorizationSampler(**sampling)
        super().__init__(sampler, loss_weight)
        if not 0.0 <= rebalance_lambda <= 1.0:
            raise ValueError(f"Colorization: `rebalance_lambda` must be in [0, 1], got {rebalance_lambda}")
        self.rebalance, self.rebalance_lambda, self.prior_sigma = rebalance, rebalance_lambda, prior_sigma
        self.prior_warmup_pixels = prior_warmup_pixels
        self.temperature, self.head_channels = temperature, head_channels
        self.num_bins = sampler.num_bins
        # derived from `grid`, so not saved; the counts are data and are saved in checkpoints
        self.register_buffer("centres", sampler.centres.clone(), persistent=False)
        self.register_buffer("prior_counts", torch.zeros(self.num_bins, dtype=torch.float64))
        # this step's counts, until synchronize() adds every rank's to prior_counts
        self.register_buffer("pending_counts", torch.zeros(self.num_bins, dtype=torch.float64), persistent=False)

    # ---- prior -----------------------------------------------------------------------------

    def empirical_prior(self) -> Tensor:
        """``(Q,)`` empirical bin distribution of the soft targets counted so far (uniform if none).

        Decided on the device (``torch.where``), so a training step never reads the counts back.
        """
        total = self.prior_counts.sum()
        uniform = torch.full_like(self.prior_counts, 1.0 / self.num_bins)
        return torch.where(total > 0, self.prior_counts / total.clamp_min(1e-300), uniform)

    def class_weights(self) -> Tensor:
        """``(Q,)`` float32 rebalancing weights (ones while the prior is still warming up, decided on the device)."""
        ones = torch.ones(self.num_bins, device=self.prior_counts.device, dtype=torch.float32)
        if not self.rebalance:
            return ones
        smoothed = smooth_prior(self.empirical_prior(), self.centres, self.prior_sigma)
        weights = rebalance_weights(smoothed, self.rebalance_lambda).to(torch.float32)
        return torch.where(self.prior_counts.sum() >= self.prior_warmup_pixels, weights, ones)

    @torch.no_grad()
    def observe(self, batch: TaskBatch) -> None:
        """Count the quantised colours (each pixel's nearest bin) of a training batch, to be added to the
        running bin prior by :meth:`synchronize` (Zhang et al. count quantised colours; the prior is
        smoothed once, by :func:`smooth_prior`, when the weights are made)."""
        assert isinstance(batch, ColorizationBatch)
        nearest = batch.target_bins[:, 0].reshape(-1)
        self.pending_counts.index_add_(0, nearest, torch.ones_like(nearest, dtype=self.pending_counts.dtype))

    @torch.no_grad()
    def synchronize(self, all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Add this step's counts of every rank (``all_reduce``: a device-side sum) to ``prior_counts``,
        so the prior is that of all the data and the same on every rank."""
        self.prior_counts += all_reduce(self.pending_counts)
        self.pending_counts.zero_()

    # ---- Task interface ------------------------------------------------------------------

    def build_head(self, channels: int, stride: int) -> nn.Module:
        """A :class:`ColorizationHead` from trunk features at ``stride`` to Q logits at ``output_stride``."""
        return ColorizationHead(channels, stride, self.num_bins, self.sampler.output_stride, self.head_channels)

    def forward(self, features: Tensor, batch: TaskBatch) -> Tensor:
        """``(N, C, h, w)`` features -> ``(N, Q, H/4, W/4)`` logits at the targets' resolution."""
        assert self.head is not None, "call attach() before forward()"
        assert isinstance(batch, ColorizationBatch)
        return self.head(features, size=tuple(batch.ab.shape[-2:]))

    def loss(self, prediction: Tensor, batch: TaskBatch) -> Tensor:
        """Mean over pixels of ``-w(top bin) Σ_q z_q log ẑ_q`` (Zhang et al. eq. 2 with eq. 3's weights)."""
        assert isinstance(batch, ColorizationBatch)
        return _weighted_soft_ce(prediction, batch, self.class_weights())

    @torch.no_grad()
    def guess_prior(self, smoothed: bool = True) -> Tensor:
        """``(Q,)`` the (smoothed) empirical prior mixed with 1e-4 of the uniform distribution, so
        that a bin never seen in training does not give an infinite loss: the no-learning guess."""
        prior = self.empirical_prior()
        if smoothed:
            prior = smooth_prior(prior, self.centres, self.prior_sigma)
        return 0.9999 * prior + 1e-4 / self.num_bins

    def prior_baseline_loss(self, batch: ColorizationBatch, smoothed: bool = False) -> Tensor:
        """The loss of always predicting the bin prior (logits = log prior), a no-learning baseline.

        ``smoothed`` uses p̃ instead of the raw empirical prior; both are mixed with 1e-4 of the
        uniform distribution so that bins never seen in training do not give an infinite loss.
        """
        prior = self.guess_prior(smoothed)
        b, _, h, w = batch.ab.shape
        logits = prior.log().to(torch.float32).view(1, -1, 1, 1).expand(b, -1, h, w)
        return _weighted_soft_ce(logits, batch, self.class_weights())

    def make_metrics(self) -> MetricCollection:
        """``top_bin_acc`` (:class:`TopBinAccuracy`), ``ab_auc`` (:class:`AbErrorAuC`, t = 0…150), ``ce``
        (:class:`SoftCrossEntropy`, the unweighted loss), and the no-learning references
        (:class:`PriorCrossEntropy`: always predicting the smoothed training prior) ``ce_prior``
        and ``loss_prior`` (weighted like the loss, with the same weights at the same moment):
        ``ce`` below ``ce_prior`` or ``loss`` below ``loss_prior`` means the net predicts colours
        from the image, beyond the data's colour statistics.

        No compute groups: while the prior warms up every weight is 1, so ``loss_prior`` equals
        ``ce_prior`` after the first update, and torchmetrics' automatic grouping (by equal
        states) would then update only one of them for the rest of the run."""
        return MetricCollection({
            "top_bin_acc": TopBinAccuracy(), "ab_auc": AbErrorAuC(), "ce": SoftCrossEntropy(),
            "ce_prior": PriorCrossEntropy(), "loss_prior": PriorCrossEntropy(weighted=True),
        }, compute_groups=False)

    def metric_inputs(self, prediction: Tensor, batch: TaskBatch) -> tuple[Tensor, ...]:
        """``(logits, target bin (B, h, w), annealed-mean ab, true ab, target bins (B, K, h, w), target
        weights, log prior (Q,), class weights (Q,))`` for the metrics' ``update``; the prior is
        the smoothed training prior mixed with 1e-4 of uniform (no bin gets probability 0)."""
        assert isinstance(batch, ColorizationBatch)
        pred_ab = annealed_mean(prediction.detach(), self.centres, self.temperature)
        prior_log = self.guess_prior(smoothed=True).log().to(torch.float32)
        return (
            prediction.detach(), batch.target_bins[:, 0], pred_ab, batch.ab, batch.target_bins, batch.target_weights,
            prior_log, self.class_weights(),
        )

    @torch.no_grad()
    def decode_rgb(self, logits: Tensor, lightness: Tensor) -> Tensor:
        """Pictures: RGB ``(B, 3, H, W)`` in [0, 1] from ``(B, Q, h, w)`` logits and L ``(B, 1, H, W)``.

        The annealed-mean ab ``(B, 2, h, w)`` is upsampled bilinearly to the lightness' size.
        """
        ab = annealed_mean(logits, self.centres, self.temperature)
        ab = F.interpolate(ab, size=lightness.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lightness.float(), ab], 1))

    @torch.no_grad()
    def pictures(self, batch: TaskBatch, prediction: Tensor | None = None, max_items: int = 4) -> dict[str, Tensor]:
        """``"colorization"``: one row per image, ``[input L (grey) | prediction | ground truth]``.

        The prediction is :meth:`decode_rgb` of the ``(B, Q, h, w)`` logits (annealed mean at
        ``temperature``, ab upsampled bilinearly to the input). The ground truth is decoded the same
        way from the batch's true ab (at the prediction resolution, upsampled bilinearly): the
        colours the task is trained to predict, i.e. the input photo up to that chroma resolution.
        Without ``prediction`` the rows are ``[L | ground truth]``.
        """
        assert isinstance(batch, ColorizationBatch)
        lightness = batch.lightness[:max_items].float()
        grey = draw.as_rgb(lightness / 100.0)
        ab = F.interpolate(batch.ab[:max_items].float(), size=lightness.shape[-2:], mode="bilinear", align_corners=False)
        truth = lab_to_rgb(torch.cat([lightness, ab], 1))
        columns = [grey, truth] if prediction is None else [grey, self.decode_rgb(prediction[:max_items], lightness), truth]
        return {"colorization": draw.grid(torch.stack(columns, dim=1)).cpu()}


def _weighted_soft_ce(logits: Tensor, batch: ColorizationBatch, class_weights: Tensor) -> Tensor:
    """Mean over pixels of ``-w[top bin] Σ_k z_k log softmax(logits)[bin_k]``.

    ``logits`` ``(B, Q, h, w)``; the sparse targets ``(B, K, h, w)`` select the K log-probabilities
    with a ``gather`` (same value as the dense ``Σ_q``, whose other terms are zero).
    """
    log_probs = torch.log_softmax(logits.float(), dim=1).gather(1, batch.target_bins)  # (B, K, h, w)
    ce = -(batch.target_weights * log_probs).sum(1)  # (B, h, w)
    weights = class_weights.to(device=logits.device)[batch.target_bins[:, 0]]
    return (weights * ce).mean()
