"""Relative position (Doersch, Gupta & Efros, ICCV 2015) as a :class:`~mtssl_lightning.tasks.base.Task`.

From each image a ``grid × grid`` lattice of square patches is cut, with a ``gap`` between
neighbouring cells and an independent ``±jitter`` on each patch (original: 3×3 grid, 96 px
patches, 48 px gaps, ±7 px jitter). For a pair (anchor, neighbour) the network predicts which
of the anchor's 8 neighbours the second patch is. The trunk embeds every *distinct* patch of
the batch once; the head pairs the embeddings by index.

**Label geometry** (the one convention used everywhere, image coordinates with row 0 at the
top and column 0 at the left): the label is the position of the *second* patch relative to the
*first* (the anchor), neighbours numbered in raster order around it::

    0 = top-left     1 = top      2 = top-right
    3 = left         (anchor)     4 = right
    5 = bottom-left  6 = bottom   7 = bottom-right

i.e. for a row/column offset ``(dr, dc)`` in ``{-1, 0, 1}²`` without ``(0, 0)``, the label is
the index of ``(dr, dc)`` in ``[(-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1)]``.

Anchors are the cells with all 8 neighbours inside the grid (for the default 3×3 grid: the
centre only). ``pairs="all"`` uses every (anchor, neighbour) pair (8 per image for 3×3);
``pairs="one"`` draws one random pair per image (only those two patches are cropped).

Shortcut counter-measures of the original, all batched on the device:

* *jitter and gaps* (above) against matching low-level edge continuations;
* *down-sampling*: a random ``downsample_fraction`` of the patches is down-sampled (area
  average) to a side drawn uniformly in ``downsample_scale × patch_size`` (default 0.1–0.5 of
  the side: for 96 px patches down to ~10×10 = 100 pixels, the original's "as little as 100
  total pixels") and up-sampled back bilinearly;
* *chromatic aberration* (``colour``): ``"drop"`` keeps one random colour channel per patch and
  replaces the other two with Gaussian noise whose std is 1/100 of the kept channel's std within
  the patch (as in the original), centred on the ImageNet mean pixel (the value that is 0 after
  the trunk's mean subtraction, i.e. what zero-mean noise was in the original's mean-subtracted
  input; an assumption); ``"gray"`` replicates the luminance ``0.299 R + 0.587 G + 0.114 B``;
  ``"lab_gray"`` is the paper's input harmonization (Lab L / 100 ×3; sets
  ``input_mode="lab_gray"``); ``"none"`` keeps RGB.

Crops are gathered from a strided ``unfold`` view of the images (exact integer crops, no
interpolation). On one CPU thread, cutting 9 patches of 96 px from each image of a
``(32, 3, 400, 400)`` batch took ~13 ms this way against ~42 ms with
``torchvision.ops.roi_align`` (``aligned=True, sampling_ratio=1``, also exact) and ~40 ms with
plain advanced indexing of the pixel coordinates; ``crop_patches(method="roi_align")`` is kept
for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchvision.ops import roi_align

from mtssl_lightning.data.batch import TaskBatch
from mtssl_lightning.data.color import lab_gray
from mtssl_lightning.tasks import pictures as draw
from mtssl_lightning.tasks.base import InputMode, Task, TaskSampler
from mtssl_lightning.tasks.heads import GlobalAvgPool
from mtssl_lightning.tasks.metrics import HitRate
from mtssl_lightning.tensor_cache import tensor_cache

PairsMode = Literal["one", "all"]
ColourMode = Literal["drop", "gray", "lab_gray", "none"]
SmallImagePolicy = Literal["upscale", "error"]
CropMethod = Literal["unfold", "roi_align"]
PoolMode = Literal["avg", "flatten"]

#: (row offset, column offset) of the neighbour for labels 0..7 (raster order, row 0 at the top)
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
NUM_CLASSES = len(NEIGHBOUR_OFFSETS)

#: fill value of dropped colour channels: the ImageNet mean pixel in [0, 1] (slim's mean / 255)
DROP_FILL_RGB = (123.68 / 255.0, 116.779 / 255.0, 103.939 / 255.0)


@dataclass
class RelativePositionBatch(TaskBatch):
    """Patches and pair targets of a relative-position step.

    Attributes:
        inputs: ``(N, 3, p, p)`` float patches in [0, 1], every distinct patch used by a pair
            once, ordered by (image, cell) with cells in raster order.
        first: ``(P,)`` int64 index into ``inputs`` of each pair's anchor patch.
        second: ``(P,)`` int64 index into ``inputs`` of each pair's neighbour patch.
        labels: ``(P,)`` int64 in 0..7, position of ``second`` relative to ``first``:
            0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 bottom,
            7 bottom-right (image coordinates, row 0 at the top).
        boxes: ``(B, grid * grid, 4)`` int64 ``(x0, y0, x1, y1)`` pixel boxes (x1, y1 exclusive)
            of all grid cells (used or not), cells in raster order, in the coordinates of the
            image after any up-scaling.
        pair_image: ``(P,)`` int64 image index of each pair.
        pair_cells: ``(P, 2)`` int64 grid cells (raster index) of ``first`` and ``second``.
        patch_image: ``(N,)`` int64 image index of each patch in ``inputs``.
        patch_cell: ``(N,)`` int64 grid cell of each patch in ``inputs``.
        downsampled: ``(N,)`` bool, patches that were down- and up-sampled.
    """

    first: Tensor
    second: Tensor
    labels: Tensor
    boxes: Tensor
    pair_image: Tensor
    pair_cells: Tensor
    patch_image: Tensor
    patch_cell: Tensor
    downsampled: Tensor


# --------------------------------------------------------------------------------------------
# functional building blocks (batched, any device)
# --------------------------------------------------------------------------------------------


def grid_span(patch_size: int, gap: int, grid: int) -> int:
    """Side in pixels of the ``grid × grid`` lattice of patches with gaps, before jitter."""
    return grid * patch_size + (grid - 1) * gap


def required_image_size(patch_size: int, gap: int, jitter: int, grid: int) -> int:
    """Smallest image side that holds the lattice with the full jitter on both sides."""
    return grid_span(patch_size, gap, grid) + 2 * jitter


def to_rgb_float(images: Tensor) -> Tensor:
    """Make ``(B, C, H, W)`` images 3-channel float in [0, 1].

    ``uint8`` is divided by 255; 1 channel (grey) is replicated; 4 channels (RGBA) lose alpha.
    Raises ``ValueError`` for any other layout, before anything reaches Kornia/torchvision.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    channels = images.shape[1]
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    elif channels == 4:
        images = images[:, :3]
    elif channels != 3:
        raise ValueError(f"images must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels}")
    return images.contiguous()


def fit_min_size(images: Tensor, min_size: int, policy: SmallImagePolicy = "upscale") -> Tensor:
    """Make sure both sides of ``(B, 3, H, W)`` images are >= ``min_size``.

    ``policy="upscale"`` resizes the whole batch bilinearly (aspect kept) so that the shorter
    side becomes ``min_size``; ``"error"`` raises a ``ValueError`` naming the sizes and the fix.
    """
    height, width = images.shape[-2:]
    if min(height, width) >= min_size:
        return images
    if policy == "error":
        raise ValueError(
            f"relative position: images are {height}x{width} px but the patch grid needs at least "
            f"{min_size}x{min_size} px (grid x patch_size + gaps + 2 x jitter); set the task's "
            f"image_size >= {min_size}, reduce patch_size/gap/jitter, or use small_images='upscale'"
        )
    if policy != "upscale":
        raise ValueError(f"small_images must be 'upscale' or 'error', got {policy!r}")
    short = min(height, width)
    scale = min_size / short
    # the shorter side lands exactly on min_size, the other keeps the aspect ratio
    size = (
        min_size if height == short else max(min_size, math.ceil(height * scale - 1e-6)),
        min_size if width == short else max(min_size, math.ceil(width * scale - 1e-6)),
    )
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def sample_grid_boxes(
    batch: int,
    height: int,
    width: int,
    patch_size: int,
    gap: int,
    jitter: int,
    grid: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random patch lattices, one per image: ``(B, grid * grid, 4)`` int64 ``(x0, y0, x1, y1)``.

    The lattice is placed uniformly at random inside the image (keeping ``jitter`` px of margin),
    then each patch is moved independently by an integer offset uniform in ``[-jitter, jitter]``
    on each axis. Cells are in raster order (row-major, row 0 at the top).
    """
    span = grid_span(patch_size, gap, grid)
    need = span + 2 * jitter
    if min(height, width) < need:
        raise ValueError(f"image {height}x{width} px is smaller than the {need} px the patch grid needs")
    device = torch.device(device) if device is not None else None
    origin = torch.stack(
        [
            torch.randint(jitter, width - span - jitter + 1, (batch,), device=device, generator=generator),
            torch.randint(jitter, height - span - jitter + 1, (batch,), device=device, generator=generator),
        ],
        dim=1,
    )  # (B, 2) as (x, y)
    step = patch_size + gap
    cells = torch.arange(grid * grid, device=device)
    nominal = torch.stack([cells % grid, cells // grid], dim=1) * step  # (G, 2) as (x, y)
    offset = torch.randint(-jitter, jitter + 1, (batch, grid * grid, 2), device=device, generator=generator)
    top_left = origin[:, None, :] + nominal[None] + offset  # (B, G, 2)
    return torch.cat([top_left, top_left + patch_size], dim=2)


def crop_patches(
    images: Tensor, image_index: Tensor, x0: Tensor, y0: Tensor, size: int, method: CropMethod = "unfold"
) -> Tensor:
    """Exact integer crops ``(N, C, size, size)`` of ``(B, C, H, W)`` images, batched.

    Args:
        images: ``(B, C, H, W)`` float images.
        image_index: ``(N,)`` int64 image of each crop.
        x0, y0: ``(N,)`` int64 top-left pixel of each crop (the crop must lie inside the image).
        size: crop side.
        method: ``"unfold"`` gathers from a strided view of all windows (fastest on CPU);
            ``"roi_align"`` uses ``torchvision.ops.roi_align`` with ``aligned=True`` and one
            sample per output pixel, which lands exactly on pixel centres for integer boxes.
    """
    if method == "unfold":
        # a view (B, C, H-s+1, W-s+1, s, s): no copy until the windows are indexed
        windows = images.unfold(2, size, 1).unfold(3, size, 1)
        return windows[image_index, :, y0, x0]
    if method == "roi_align":
        rois = torch.stack([image_index, x0, y0, x0 + size, y0 + size], dim=1).to(images.dtype)
        return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    raise ValueError(f"method must be 'unfold' or 'roi_align', got {method!r}")


def downsample_upsample(patches: Tensor, sides: Tensor) -> Tensor:
    """Down-sample each patch to its own side, then up-sample back: ``(M, C, p, p)`` -> same.

    Batched over patches of different target sizes, as one linear map per patch: both steps are
    separable, so ``out = R X Rᵀ`` with ``R = U A`` ``(M, p, p)``. ``A`` ``(s, p)`` is exact area
    averaging (row ``j`` weighs each pixel by its overlap with ``[j p / s, (j + 1) p / s)``; the same
    as ``F.interpolate(mode="area")`` when ``s`` divides ``p``); ``U`` ``(p, s)`` is bilinear with
    half-pixel centres (``F.interpolate(mode="bilinear", align_corners=False)``). Why matrices
    rather than ``roi_align`` + ``grid_sample``: a fixed amount of work whatever the sides (no
    largest side to read back from the device, no canvas sampled at the smallest side's rate),
    two small batched matmuls.

    Args:
        patches: ``(M, C, p, p)`` float patches.
        sides: ``(M,)`` int64 down-sampled side of each patch, in ``[1, p]``.
    """
    count, _, size, _ = patches.shape
    if count == 0:
        return patches
    table = _resampling_table(size, patches.dtype, patches.device)  # (p + 1, p, p)
    resample = table[sides.to(device=patches.device).clamp(1, size)]  # (M, p, p)
    return resample[:, None] @ patches @ resample[:, None].transpose(-1, -2)


@tensor_cache(maxsize=16)
def _resampling_table(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(size + 1, size, size)``: :func:`_resampling_matrices` of every side ``0 … size`` (side 0
    as side 1), made once per size, dtype and device; a batch then gathers its patches' rows
    instead of building ``M`` matrices every step."""
    return _resampling_matrices(torch.arange(size + 1, device=device).clamp(min=1), size, dtype)


def _resampling_matrices(sides: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """``(M, size, size)`` bilinear-up @ area-down matrices for ``(M,)`` sides (rows/columns past a
    side are zero in the intermediate ``size``-wide space)."""
    device = sides.device
    side = sides.to(dtype)[:, None, None]  # (M, 1, 1)
    index = torch.arange(size, device=device, dtype=dtype)
    # A[m, j, x]: overlap of pixel [x, x + 1) with bin [j p / s, (j + 1) p / s), over the bin's width
    width = size / side
    lo, hi = index[None, :, None] * width, (index[None, :, None] + 1) * width  # (M, p, 1) bin edges
    overlap = (torch.minimum(hi, index[None, None, :] + 1) - torch.maximum(lo, index[None, None, :])).clamp(min=0)
    area = torch.where(index[None, :, None] < side, overlap / width, 0.0)  # (M, p bins, p pixels)
    # U[m, i, j]: output pixel i's bilinear weight on bin j (half-pixel centres, clamped to the bins)
    src = ((index[None, :, None] + 0.5) * side / size - 0.5).clamp(min=0.0)  # (M, p, 1)
    src = torch.minimum(src, side - 1)
    below = src.floor()
    frac = src - below
    up = (1 - frac) * (index[None, None, :] == below) + frac * (index[None, None, :] == below + 1)  # (M, p, p bins)
    return up @ area


def colour_transform(patches: Tensor, mode: ColourMode, generator: torch.Generator | None = None) -> Tensor:
    """Apply the chromatic-aberration counter-measure to ``(N, 3, p, p)`` patches in [0, 1].

    See the module docstring for the modes. ``"drop"`` keeps one uniformly random channel per
    patch unchanged and fills the two others with ``N(mean pixel, (std_kept / 100)²)``.
    """
    if mode == "none":
        return patches
    if mode == "gray":  # BT.601 luma (Kornia's rgb_to_grayscale weights), with scalar weights: no constant tensor
        grey = 0.299 * patches[:, 0:1] + 0.587 * patches[:, 1:2] + 0.114 * patches[:, 2:3]
        return grey.expand(-1, 3, -1, -1).contiguous()
    if mode == "lab_gray":
        return lab_gray(patches)
    if mode != "drop":
        raise ValueError(f"colour must be 'drop', 'gray', 'lab_gray' or 'none', got {mode!r}")
    count = patches.shape[0]
    rows = torch.arange(count, device=patches.device)
    keep = torch.randint(0, 3, (count,), device=patches.device, generator=generator)
    kept = patches[rows, keep]  # (N, p, p)
    std = kept.flatten(1).std(dim=1, unbiased=False)[:, None, None, None] / 100.0
    fill = _drop_fill(patches.device, patches.dtype)
    # in place on the noise tensor: one full-size allocation instead of three (noise, fill + noise, where)
    out = torch.randn(patches.shape, device=patches.device, dtype=patches.dtype, generator=generator)
    out.mul_(std).add_(fill)
    out[rows, keep] = kept
    return out


@tensor_cache(maxsize=16)
def _drop_fill(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The dropped channels' fill colour ``(1, 3, 1, 1)``, made once per device (not copied from the host every batch)."""
    return torch.tensor(DROP_FILL_RGB, device=device, dtype=dtype)[None, :, None, None]


def pair_table(grid: int, device: torch.device | str | None = None) -> Tensor:
    """All (anchor cell, neighbour cell, label) triples of a ``grid × grid`` lattice: ``(A*8, 3)``.

    Anchors are the cells whose 8 neighbours are all inside the grid, in raster order; for each
    anchor the 8 neighbours follow in label order (see :data:`NEIGHBOUR_OFFSETS`).
    """
    if grid < 3:
        raise ValueError(f"grid must be >= 3 (an anchor needs 8 neighbours), got {grid}")
    inner = torch.arange(1, grid - 1, device=device)
    rows, cols = torch.meshgrid(inner, inner, indexing="ij")
    rows, cols = rows.reshape(-1, 1), cols.reshape(-1, 1)  # (A, 1)
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device)  # (8, 2)
    anchor = (rows * grid + cols).expand(-1, NUM_CLASSES)
    neighbour = (rows + offsets[:, 0]) * grid + (cols + offsets[:, 1])
    labels = torch.arange(NUM_CLASSES, device=device).expand_as(anchor)
    return torch.stack([anchor, neighbour, labels], dim=-1).reshape(-1, 3)


@tensor_cache(maxsize=16)
def _cached_pair_table(grid: int, device: torch.device) -> Tensor:
    """:func:`pair_table` made once per device (a host-to-device copy per batch otherwise)."""
    return pair_table(grid, device)


# --------------------------------------------------------------------------------------------
# head
# --------------------------------------------------------------------------------------------


class PairAccuracy(HitRate):
    """Share of pairs whose most likely relative position is the true one.

    ``update(logits (P, 8), labels (P,))``; micro-averaged over pairs, updates and processes.
    """

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.count(logits.argmax(1) == labels)


class RelativePositionHead(nn.Module):
    """Per-patch embedding then pair classifier.

    ``embed``: ``(N, C, h, w)`` features -> pooling -> fc -> ReLU -> dropout, where the pooling
    is a global average (``pool="avg"``) or, like the original's fc6 on the pool5 map, a flatten
    of the whole ``(C, h, w)`` map (``pool="flatten"``, needs ``feature_size = (h, w)``; keeps
    where things are inside the patch);
    ``classify``: concat(emb[first], emb[second]) -> fc -> ReLU -> dropout -> fc -> 8 logits.
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 4096,
        dropout: float = 0.5,
        pool: PoolMode = "avg",
        feature_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if pool == "avg":
            reduce: nn.Module = GlobalAvgPool()
            in_features = channels
        elif pool == "flatten":
            if feature_size is None:
                raise ValueError("pool='flatten' needs the feature map size (h, w) of one patch")
            reduce, in_features = nn.Flatten(1), channels * feature_size[0] * feature_size[1]
        else:
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        self.embed = nn.Sequential(reduce, nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classify = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, NUM_CLASSES)
        )

    def forward(self, features: Tensor, first: Tensor, second: Tensor) -> Tensor:
        """``(N, C, h, w)`` features and ``(P,)`` pair indices -> ``(P, 8)`` logits."""
        embedding = self.embed(features)  # each distinct patch embedded once
        return self.classify(torch.cat([embedding[first], embedding[second]], dim=1))


# --------------------------------------------------------------------------------------------
# sampler (the input builder the DataModule calls on the device)
# --------------------------------------------------------------------------------------------


class RelativePositionSampler(TaskSampler):
    """Patches and pair labels of a jittered grid, from a batch of images (see the module docstring).

    Args:
        batch_size: images per step (each gives 1 pair, or 8 for a 3×3 grid with ``pairs="all"``).
        image_size: side of the square crops the DataModule delivers; ``None`` means
            :attr:`required_size` (398 px with the defaults). Must be >= that.
        input_mode: ``"rgb"`` or ``"lab_gray"``; ``"lab_gray"`` implies ``colour="lab_gray"``
            (harmonization replaces the task's own colour preprocessing, as in the paper).
        patch_size: patch side in pixels (original 96).
        gap: pixels between neighbouring cells of the grid (original 48).
        jitter: max per-patch offset in pixels on each axis (original 7).
        grid: cells per side (original 3); anchors are the cells with 8 neighbours inside.
        pairs: ``"one"`` random (anchor, neighbour) pair per image, or ``"all"`` of them.
        downsample_fraction: probability that a patch is down- and up-sampled.
        downsample_scale: range of the down-sampled side as a fraction of ``patch_size``.
        colour: chromatic-aberration counter-measure, ``"drop"``, ``"gray"``, ``"lab_gray"`` or
            ``"none"``; ``None`` means ``"lab_gray"`` if ``input_mode="lab_gray"``, else ``"drop"``.
        small_images: images smaller than :attr:`required_size`: ``"upscale"`` them (bilinear) or
            raise an ``"error"``.
    """

    def __init__(
        self,
        batch_size: int = 32,
        image_size: int | None = None,
        input_mode: InputMode = "rgb",
        crop_area: tuple[float, float] | None = None,
        patch_size: int = 96,
        gap: int = 48,
        jitter: int = 7,
        grid: int = 3,
        pairs: PairsMode = "one",
        downsample_fraction: float = 0.33,
        downsample_scale: tuple[float, float] = (0.1, 0.5),
        colour: ColourMode | None = None,
        small_images: SmallImagePolicy = "upscale",
    ) -> None:
        name = self.task_name
        if patch_size < 1 or gap < 0 or jitter < 0:
            raise ValueError(f"{name}: need patch_size >= 1, gap >= 0, jitter >= 0; got {patch_size}, {gap}, {jitter}")
        if grid < 3:
            raise ValueError(f"{name}: `grid` must be >= 3 so that a cell has 8 neighbours, got {grid}")
        if pairs not in ("one", "all"):
            raise ValueError(f"{name}: `pairs` must be 'one' or 'all', got {pairs!r}")
        if not 0.0 <= downsample_fraction <= 1.0:
            raise ValueError(f"{name}: `downsample_fraction` must be in [0, 1], got {downsample_fraction}")
        low, high = downsample_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"{name}: `downsample_scale` must satisfy 0 < low <= high <= 1, got {downsample_scale}")
        if small_images not in ("upscale", "error"):
            raise ValueError(f"{name}: `small_images` must be 'upscale' or 'error', got {small_images!r}")
        if colour is None:
            colour = "lab_gray" if input_mode == "lab_gray" else "drop"
        if colour not in ("drop", "gray", "lab_gray", "none"):
            raise ValueError(f"{name}: `colour` must be 'drop', 'gray', 'lab_gray' or 'none', got {colour!r}")
        if input_mode == "lab_gray" and colour != "lab_gray":
            raise ValueError(
                f"{name}: input_mode='lab_gray' (harmonization) conflicts with colour={colour!r}; "
                "use colour='lab_gray' (or leave it unset)"
            )
        if colour == "lab_gray":
            input_mode = "lab_gray"  # harmonized input: keep the base class's view consistent
        required = required_image_size(patch_size, gap, jitter, grid)
        if image_size is None:
            image_size = required
        if image_size < required:
            raise ValueError(
                f"{name}: image_size={image_size} is too small for a {grid}x{grid} grid of "
                f"{patch_size} px patches with {gap} px gaps and +-{jitter} px jitter: it needs "
                f"{grid}*{patch_size} + {grid - 1}*{gap} + 2*{jitter} = {required} px; "
                f"set image_size >= {required} or shrink patch_size/gap/jitter"
            )
        super().__init__(batch_size=batch_size, image_size=image_size, input_mode=input_mode, crop_area=crop_area)
        self.patch_size, self.gap, self.jitter, self.grid = patch_size, gap, jitter, grid
        self.pairs: PairsMode = pairs
        self.downsample_fraction = downsample_fraction
        self.downsample_scale = (float(low), float(high))
        self.colour: ColourMode = colour
        self.small_images: SmallImagePolicy = small_images

    def rescale(self, factor: float) -> None:
        """Scale patch size, gap, jitter and the crop size together (``model.pixel_scale``)."""
        self.patch_size = max(1, round(self.patch_size * factor))
        self.gap, self.jitter = round(self.gap * factor), round(self.jitter * factor)
        self.image_size = max(round(self.image_size * factor), self.required_size)

    @property
    def required_size(self) -> int:
        """Smallest image side the grid fits in: ``grid·patch + (grid-1)·gap + 2·jitter``."""
        return required_image_size(self.patch_size, self.gap, self.jitter, self.grid)

    @torch.no_grad()
    def build(self, images: Tensor, generator: torch.Generator | None = None) -> RelativePositionBatch:
        """Patches and pair labels from ``(B, C, H, W)`` images (uint8, or float in [0, 1]).

        ``C`` may be 1 (grey, replicated) or 4 (RGBA, alpha dropped); images smaller than
        :attr:`required_size` are handled by ``small_images``.
        """
        images = fit_min_size(to_rgb_float(images), self.required_size, self.small_images)
        batch, _, height, width = images.shape
        device, cells = images.device, self.grid * self.grid
        boxes = sample_grid_boxes(batch, height, width, self.patch_size, self.gap, self.jitter, self.grid, device, generator)

        # pairs as (image, anchor cell, neighbour cell, label); the patches each image needs are known
        # from the mode alone (no data-dependent sizes, so nothing is read back from the device)
        table = _cached_pair_table(self.grid, device)  # (A*8, 3)
        images_of = torch.arange(batch, device=device)
        if self.pairs == "all":
            # the anchors' neighbours cover the whole grid: every cell of every image is used once
            image_of_pair = images_of.repeat_interleave(table.shape[0])
            anchor, neighbour, labels = table.repeat(batch, 1).unbind(dim=1)
            patch_image = images_of.repeat_interleave(cells)
            patch_cell = torch.arange(cells, device=device).repeat(batch)
            first, second = image_of_pair * cells + anchor, image_of_pair * cells + neighbour
        else:
            # two patches per image, the lower cell first ((image, cell) raster order)
            image_of_pair = images_of
            chosen = table[torch.randint(0, table.shape[0], (batch,), device=device, generator=generator)]
            anchor, neighbour, labels = chosen.unbind(dim=1)
            patch_image = images_of.repeat_interleave(2)
            patch_cell = torch.stack([torch.minimum(anchor, neighbour), torch.maximum(anchor, neighbour)], dim=1).reshape(-1)
            first, second = 2 * images_of + (anchor > neighbour).long(), 2 * images_of + (anchor < neighbour).long()

        top_left = boxes[patch_image, patch_cell]  # (N, 4)
        patches = crop_patches(images, patch_image, top_left[:, 0], top_left[:, 1], self.patch_size)

        # every patch is resampled at its own side and the chosen ones are kept (a blend, not a
        # data-dependent selection: the same kernels whatever is drawn)
        count = patch_image.shape[0]
        downsampled = torch.rand(count, device=device, generator=generator) < self.downsample_fraction
        if self.downsample_fraction > 0:
            low = max(1, round(self.downsample_scale[0] * self.patch_size))
            high = max(low, round(self.downsample_scale[1] * self.patch_size))
            sides = torch.randint(low, high + 1, (count,), device=device, generator=generator)
            resampled = downsample_upsample(patches, sides)
            patches = torch.where(downsampled[:, None, None, None], resampled, patches)

        inputs = colour_transform(patches.clamp(0.0, 1.0), self.colour, generator).contiguous()
        return RelativePositionBatch(
            inputs=inputs,
            first=first,
            second=second,
            labels=labels,
            boxes=boxes,
            pair_image=image_of_pair,
            pair_cells=torch.stack([anchor, neighbour], dim=1),
            patch_image=patch_image,
            patch_cell=patch_cell,
            downsampled=downsampled,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, patch_size={self.patch_size}, gap={self.gap}, jitter={self.jitter}, "
            f"pairs={self.pairs!r}, colour={self.colour!r}, image_size={self.image_size})"
        )


# --------------------------------------------------------------------------------------------
# task
# --------------------------------------------------------------------------------------------


class RelativePosition(Task):
    """Relative position prediction between patches of a jittered grid (8-way classification).

    Args:
        loss_weight: weight of this task's loss in the "sum of weighted losses" mode.
        hidden: width of the fc layers (original 4096).
        dropout: dropout after each hidden fc layer.
        pool: how the per-patch ``(C, h, w)`` features become a vector before the first fc:
            ``"avg"`` (global average) or ``"flatten"`` (the whole map, as the original's fc6 on
            pool5; keeps the layout inside the patch, which the task relies on).
        **sampling: the sampling settings, arguments of :class:`RelativePositionSampler`
            (``batch_size``, ``image_size``, ``input_mode``, ``patch_size``, ``gap``, ``jitter``,
            ``grid``, ``pairs``, ``downsample_fraction``, ``downsample_scale``, ``colour``,
            ``small_images``); the sampler is ``task.sampler``.
    """

    sampler: RelativePositionSampler

    def __init__(
        self, loss_weight: float = 1.0, hidden: int = 4096, dropout: float = 0.5, pool: PoolMode = "avg", **sampling: Any
    ) -> None:
        super().__init__(RelativePositionSampler(**sampling), loss_weight)
        if pool not in ("avg", "flatten"):
            raise ValueError(f"{type(self).__name__}: `pool` must be 'avg' or 'flatten', got {pool!r}")
        self.hidden, self.dropout, self.pool = hidden, dropout, pool

    # ---- head ---------------------------------------------------------------------------

    def build_head(self, channels: int, stride: int) -> nn.Module:
        """A :class:`RelativePositionHead` on ``channels``-channel features at ``stride``."""
        side = math.ceil(self.sampler.patch_size / stride)  # trunk output side for one patch
        return RelativePositionHead(channels, self.hidden, self.dropout, self.pool, (side, side))

    def forward(self, features: Tensor, batch: TaskBatch) -> Tensor:
        """``(N, C, h, w)`` features of ``batch.inputs`` -> ``(P, 8)`` pair logits."""
        assert self.head is not None, "call attach() before forward()"
        assert isinstance(batch, RelativePositionBatch)
        return self.head(features, batch.first, batch.second)

    # ---- loss and metrics --------------------------------------------------------------

    def loss(self, prediction: Tensor, batch: TaskBatch) -> Tensor:
        """Cross-entropy of ``(P, 8)`` logits against ``batch.labels`` (log-softmax + gather: CUDA's
        ``nll_loss`` has no deterministic kernel, so ``F.cross_entropy`` would fail with
        ``trainer.deterministic: true``)."""
        assert isinstance(batch, RelativePositionBatch)
        log_probs = torch.log_softmax(prediction.float(), dim=1)
        return -log_probs.gather(1, batch.labels[:, None]).mean()

    def make_metrics(self) -> MetricCollection:
        """8-way pair accuracy (:class:`PairAccuracy`; torchmetrics' ``MulticlassAccuracy`` checks its
        arguments and counts with ``bincount``, both host syncs on a GPU, in every update)."""
        return MetricCollection({"accuracy": PairAccuracy()})

    def metric_inputs(self, prediction: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(logits (P, 8), labels (P,))``."""
        assert isinstance(batch, RelativePositionBatch)
        return prediction.detach(), batch.labels

    # ---- pictures ----------------------------------------------------------------------

    @torch.no_grad()
    def pictures(self, batch: TaskBatch, prediction: Tensor | None = None, max_items: int = 4) -> dict[str, Tensor]:
        """``"pairs"``: one 3×3 canvas per pair, the anchor patch in the centre cell and the neighbour
        patch in its true cell (label ``k`` ↔ offset ``NEIGHBOUR_OFFSETS[k]``), as the trunk sees them.

        Empty cells are ``EMPTY`` grey. Every cell is framed by ``border`` px (``max(1, patch_size // 16)``)
        of ``BACKGROUND``; with a ``prediction`` (``(P, 8)`` logits) the frame of the predicted cell is
        green when it is the true cell, red otherwise. ``max_items`` pairs are taken evenly spaced over
        the batch's pairs (so they come from different images and positions; ``max_items >= P`` shows
        every pair in order). Any ``grid`` works: the canvas is the anchor's 3×3 neighbourhood.
        Canvases are side by side: tile ``(0, i)`` of :func:`~mtssl_lightning.tasks.pictures.grid`,
        each ``3·(patch_size + 2·border)`` px square; cell ``(r, c)`` of a canvas starts at
        ``(r·(p + 2b) + b, c·(p + 2b) + b)``.
        """
        assert isinstance(batch, RelativePositionBatch)
        pairs = batch.labels.shape[0]
        count = min(max_items, pairs)
        device = batch.inputs.device
        chosen = torch.linspace(0, pairs - 1, count, device=device).round().long()
        anchors = draw.as_rgb(batch.inputs[batch.first[chosen]])
        neighbours = draw.as_rgb(batch.inputs[batch.second[chosen]])
        offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device)  # (8, 2) as (dr, dc)
        to_cell = lambda label: (1 + offsets[label, 0]) * 3 + (1 + offsets[label, 1])  # 3×3 raster index
        true_cell = to_cell(batch.labels[chosen])
        rows = torch.arange(count, device=device)

        size = anchors.shape[-1]
        border = max(1, size // 16)
        cells = torch.full((count, 9, 3, size, size), draw.EMPTY, device=device)
        cells[:, 4] = anchors
        cells[rows, true_cell] = neighbours
        frames = torch.full((count, 9, 3), draw.BACKGROUND, device=device)
        if prediction is not None:
            predicted = prediction[chosen].argmax(1)
            correct = (predicted == batch.labels[chosen])[:, None]
            colour = torch.where(correct, torch.tensor(draw.GREEN, device=device), torch.tensor(draw.RED, device=device))
            frames[rows, to_cell(predicted)] = colour
        framed = draw.outline(cells.flatten(0, 1), frames.flatten(0, 1), border)  # (count·9, 3, s, s)
        slot = size + 2 * border
        canvas = framed.view(count, 3, 3, 3, slot, slot).permute(0, 3, 1, 4, 2, 5).reshape(count, 3, 3 * slot, 3 * slot)
        return {"pairs": draw.grid(canvas).cpu()}
