"""Motion masks on the device: which pixels of a clip's key frame move on their own.

The motion-segmentation task (Pathak et al. 2017) learns to predict, from one frame, the
pixels that move independently of the camera. Pathak et al. obtain such masks with uNLC, an
unsupervised video segmentation; here they are computed on the device, batched over clips, by
a simpler and much cheaper method (a documented deviation; precomputed uNLC or optical-flow
masks can be supplied instead, see :class:`~mtssl_lightning.data.frames.FrameFolder`):

1. **Camera motion** between the key frame ``T // 2`` and every other frame is modelled as a
   translation (pan / tilt) and estimated by phase correlation of the Tukey-windowed grey frames
   (:func:`estimate_shift`, sub-pixel by a parabola through the correlation peak).
2. Each frame is **warped** onto the key frame by its shift (bilinear); pixels that come from
   outside the frame are marked invalid.
3. The **residual** ``|key − warped|`` (grey, 3×3 box-blurred) is averaged over the frames
   before the key frame and over the frames after it, and the two are combined with a minimum:
   a pixel of a moving object in the key frame differs from both its past and its future,
   while the object's old and new places (the "ghosts" of two-frame differencing) differ from
   only one side. Where one side is invalid the other side is used alone.
4. The residual is **thresholded** (absolute, in [0, 1] grey levels), cleaned by a binary
   morphological opening (removes specks) and closing (fills holes) with a square structuring
   element (shifted ORs and ANDs of bool masks; equal to ``kornia.morphology.opening/closing``
   with its default geodesic border), and **connected components** smaller than ``min_area`` of
   the frame are dropped (exact 8-connectivity, :func:`connected_components`' block union-find
   with a fixed number of rounds, see :func:`_union_find_schedule`).

Every step runs batched on the clips' device **without host synchronisation**: no value is read
back, no size depends on the data and no tensor is built from Python data per call (the masks
are computed in the DataModule before every training step, and a GPU must not wait for the host
there; ``tests/host_syncs.py`` checks it on the CPU).

Zoom, rotation and parallax of a static scene are not modelled and can leave residual motion
at strong edges; the opening and the component filter remove most of it on typical footage.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import kornia.color
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MotionMaskConfig", "connected_components", "estimate_shift", "motion_masks", "shift_images"]


def _tukey(size: int, device: torch.device, taper: float = 0.25) -> Tensor:
    """``(size,)`` Tukey window: cosine tapers over ``taper / 2`` of each end, flat (1) between.

    Flat rather than Hann so that the centre of the frame (where a filmed object often is) does
    not outweigh the background in the estimate of the camera motion.
    """
    x = torch.linspace(0.0, 1.0, size, device=device, dtype=torch.float32)
    edge = taper / 2
    ramp = lambda u: 0.5 * (1 - torch.cos(torch.pi * u / edge))  # rises 0 -> 1 over [0, edge]
    return torch.where(x < edge, ramp(x), torch.where(x > 1 - edge, ramp(1 - x), torch.ones_like(x)))


@functools.lru_cache(maxsize=16)
def _window(h: int, w: int, device: torch.device) -> Tensor:
    """``(h, w)`` separable Tukey window, made once per size and device (not on every call)."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first built in inference mode
        return torch.outer(_tukey(h, device), _tukey(w, device))


def estimate_shift(reference: Tensor, moving: Tensor) -> Tensor:
    """Translation that maps ``moving`` onto ``reference``, by phase correlation.

    Args:
        reference: ``(N, H, W)`` grey images.
        moving: ``(N, H, W)`` grey images of the same size.

    Returns:
        ``(N, 2)`` float ``(dy, dx)`` in pixels such that ``moving(y - dy, x - dx) ≈
        reference(y, x)``, i.e. the content of ``moving`` is shifted by ``(dy, dx)`` to match
        ``reference``; within ±H/2, ±W/2, sub-pixel from a parabola through the peak and its
        two neighbours along each axis.
    """
    n, h, w = reference.shape
    window = _window(h, w, reference.device)

    def spectrum(x: Tensor) -> Tensor:
        x = x.float()
        return torch.fft.rfft2((x - x.mean((-2, -1), keepdim=True)) * window)

    cross = spectrum(reference) * spectrum(moving).conj()
    correlation = torch.fft.irfft2(cross / cross.abs().clamp_min(1e-8), s=(h, w))  # (N, H, W)
    peak = correlation.reshape(n, -1).argmax(1)
    py, px = peak // w, peak % w

    def refine(values: Tensor, centre: Tensor, size: int) -> Tensor:
        # parabola through (-1, c0), (0, c1), (1, c2); offset in [-0.5, 0.5]
        c0, c1, c2 = values.unbind(1)
        denom = c0 - 2 * c1 + c2
        offset = torch.where(denom.abs() > 1e-12, 0.5 * (c0 - c2) / torch.where(denom == 0, 1.0, denom), 0.0)
        shift = centre.float() + offset.clamp(-0.5, 0.5)
        return torch.where(shift > size / 2, shift - size, shift)  # wrap to ±size/2

    rows = torch.arange(n, device=reference.device)
    around_y = torch.stack([correlation[rows, (py + d) % h, px] for d in (-1, 0, 1)], 1)
    around_x = torch.stack([correlation[rows, py, (px + d) % w] for d in (-1, 0, 1)], 1)
    return torch.stack([refine(around_y, py, h), refine(around_x, px, w)], 1)


def shift_images(images: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Translate images by ``shift`` with bilinear sampling.

    Args:
        images: ``(N, C, H, W)``.
        shift: ``(N, 2)`` ``(dy, dx)`` in pixels; output ``(y, x)`` reads input ``(y - dy, x - dx)``.

    Returns:
        The shifted images ``(N, C, H, W)`` and ``(N, 1, H, W)`` bool validity (read from
        inside the input).
    """
    n, _, h, w = images.shape
    ys = torch.arange(h, device=images.device, dtype=torch.float32)
    xs = torch.arange(w, device=images.device, dtype=torch.float32)
    src_y = ys.view(1, h, 1) - shift[:, 0].view(n, 1, 1).float()
    src_x = xs.view(1, 1, w) - shift[:, 1].view(n, 1, 1).float()
    # align_corners=True: -1 and 1 are the centres of the first and last pixels
    grid = torch.stack([
        (2 * src_x / max(w - 1, 1) - 1).expand(n, h, w),
        (2 * src_y / max(h - 1, 1) - 1).expand(n, h, w),
    ], -1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    valid = (src_y >= 0) & (src_y <= h - 1) & (src_x >= 0) & (src_x <= w - 1)
    return out, valid.view(n, 1, h, w)


@dataclass
class MotionMaskConfig:
    """Settings of :func:`motion_masks`.

    Attributes:
        threshold: residual grey-level difference (in [0, 1]) above which a pixel moves.
        open_size: side of the square structuring element of the opening (odd; 1 = none).
        close_size: side of the closing's structuring element (odd; 1 = none).
        min_area: connected components smaller than this fraction of the frame are dropped.
    """

    threshold: float = 0.05
    open_size: int = 3
    close_size: int = 7
    min_area: float = 0.005

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"motion mask `threshold` must be in (0, 1), got {self.threshold}")
        for name in ("open_size", "close_size"):
            size = getattr(self, name)
            if size < 1 or size % 2 == 0:
                raise ValueError(f"motion mask `{name}` must be an odd number >= 1, got {size}")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"motion mask `min_area` must be in [0, 1), got {self.min_area}")


# ---------------------------------------------------------------------------------------------
# binary morphology and connected components, without host synchronisation
# ---------------------------------------------------------------------------------------------


def _square(mask: Tensor, size: int, dilate: bool) -> Tensor:
    """Binary dilation (OR) or erosion (AND) of a bool ``(..., H, W)`` mask over a ``size`` × ``size`` square (odd).

    Separable: a square's OR (AND) is the OR (AND) over its rows of each row's. Along each axis the
    output ORs (ANDs) the input shifted by ``1 … size // 2`` pixels either way, and a shift never
    reads past the border, so a window takes only its pixels inside the image: Kornia's default
    ``border_type="geodesic"`` (``kornia.morphology.dilation``/``erosion`` with an all-ones kernel).
    """
    # Not kornia.morphology (nor max_pool2d): open 3 + close 7 of 16 × 224² on this project's CPU, one thread:
    # Kornia 118 ms (its CUDA engine, unfold, materialises all size² shifted copies: 465 ms for one 7 × 7 dilation),
    # separable max_pool2d 181 ms, these in-place bool shifts 2 ms.
    half = size // 2
    for axis in (-1, -2):
        out, n = mask.clone(), mask.shape[axis]
        # out[i] |= mask[i - d] and out[i] |= mask[i + d] (or &=) where i ± d is inside the image
        for d in range(1, min(half, n - 1) + 1):
            for target, source in (
                (out.narrow(axis, d, n - d), mask.narrow(axis, 0, n - d)),
                (out.narrow(axis, 0, n - d), mask.narrow(axis, d, n - d)),
            ):
                target.logical_or_(source) if dilate else target.logical_and_(source)
        mask = out
    return mask


def _open(mask: Tensor, size: int) -> Tensor:
    """Binary opening (erosion, then dilation) of a bool mask: removes specks narrower than ``size``."""
    return _square(_square(mask, size, dilate=False), size, dilate=True) if size > 1 else mask


def _close(mask: Tensor, size: int) -> Tensor:
    """Binary closing (dilation, then erosion) of a bool mask: fills holes and gaps narrower than ``size``."""
    return _square(_square(mask, size, dilate=True), size, dilate=False) if size > 1 else mask


def _block_graph(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The graph of 2 × 2 blocks of an ``(N, H, W)`` bool mask (block-based labelling).

    In 8-connectivity the foreground pixels of a 2 × 2 block are always connected to each other,
    so components can be found on the ``⌈H/2⌉ × ⌈W/2⌉`` blocks instead of the pixels (Allegretti,
    Bolelli & Grana, "Optimized Block-Based Algorithms to Label Connected Components on GPUs",
    TPDS 2020; the same contraction and block numbering as
    ``kornia.contrib.connected_components_union_find``). Two neighbouring blocks are connected when
    they hold 8-adjacent foreground pixels.

    Returns:
        ``pixels``: ``(N, ⌈H/2⌉, ⌈W/2⌉)`` int64 foreground pixels of each block (0 to 4);
        ``neighbours``: ``(8, N·⌈H/2⌉·⌈W/2⌉)`` int64: for each direction, the flat index of the
        block's neighbour in that direction when the two are connected, else the block's own index.
        Blocks are numbered in raster order over the flattened batch.
    """
    n, h, w = mask.shape
    padded = mask.new_zeros((n, h + h % 2, w + w % 2))  # even sides; the padding is background
    padded[:, :h, :w] = mask
    tl, tr, bl, br = padded[:, ::2, ::2], padded[:, ::2, 1::2], padded[:, 1::2, ::2], padded[:, 1::2, 1::2]
    hb, wb = tl.shape[-2:]
    pixels = padded.view(n, hb, 2, wb, 2).sum((2, 4))
    ids = torch.arange(n * hb * wb, device=mask.device).view(n, hb, wb)
    # edges as in Kornia: block (i, j) with its left, upper, upper-left and upper-right neighbour
    left = (tl[:, :, 1:] | bl[:, :, 1:]) & (tr[:, :, :-1] | br[:, :, :-1])  # (n, hb, wb - 1)
    above = (tl[:, 1:] | tr[:, 1:]) & (bl[:, :-1] | br[:, :-1])  # (n, hb - 1, wb)
    above_left = tl[:, 1:, 1:] & br[:, :-1, :-1]  # (n, hb - 1, wb - 1)
    above_right = tr[:, 1:, :-1] & bl[:, :-1, 1:]  # (n, hb - 1, wb - 1)
    neighbours = ids.expand(8, n, hb, wb).clone()
    # each edge gives two directions: (slice of the block, slice of its neighbour)
    pairs = [
        (left, (slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        (above, (slice(1, None), slice(None)), (slice(None, -1), slice(None))),
        (above_left, (slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),
        (above_right, (slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),
    ]
    for k, (edge, here, there) in enumerate(pairs):
        a, b = (slice(None), *here), (slice(None), *there)
        neighbours[2 * k][a] = torch.where(edge, ids[b], ids[a])
        neighbours[2 * k + 1][b] = torch.where(edge, ids[a], ids[b])
    return pixels, neighbours.view(8, -1)


def _union_find_schedule(blocks: int, doublings: int) -> list[int]:
    """Pointer-jumping steps of each of the ``2 · doublings`` hooking rounds of :func:`_union_find`.

    Each round starts from a forest of *stars* (every block points to its tree's root, the smallest
    block index of the tree), so the trees of a component are vertices of a quotient graph with
    distinct labels. Hooking: every root takes the smallest root among the trees adjacent to its
    tree if that is smaller (Kornia's ``scatter_reduce_`` ``amin``); the trees that hook nowhere
    are the local minima and each becomes the root of one new tree.

    **Rounds.** A tree that neither hooks nor is hooked onto in a round is a local minimum all of
    whose neighbours hooked onto trees with smaller labels; in the next round it is adjacent to
    those, so it hooks. Every root after two rounds is therefore a tree of the first of them that
    merged at least two trees. By induction: *after 2k rounds, every tree that is not a whole
    component holds at least 2^k blocks* (the per-round halving argument does not hold: a local
    minimum can stay alone for one round). Hence 2k rounds with ``2^(k+1) > blocks`` (a component
    split in two such trees would exceed the image) label every component completely; and for the
    size filter, 2k rounds with ``2^k >= min_pixels`` suffice: a tree is then either its whole
    component or already has ``>= 2^k`` blocks, i.e. ``>= min_pixels`` pixels, and so does its
    component — ``tree area >= min_pixels`` iff ``component area >= min_pixels``.

    **Jumps.** Hooks point from a root to a smaller root, so they form chains of distinct trees of
    one component: after hooking, a block is at most ``T`` links from its new root, ``T`` the
    number of trees of its component, at most ``blocks // 2^floor(r/2)`` before round ``r``
    (0-based, by the bound above). Each pointer-jumping step (``p <- p[p]``) doubles the distance
    a pointer spans, so ``ceil(log2 T)`` steps restore stars.

    Kornia's ``connected_components_union_find`` instead repeats hooking and jumping until nothing
    changes, which needs a host synchronisation per step; these fixed counts need none.

    Args:
        blocks: blocks per image (a component is never larger).
        doublings: ``k`` (see above).

    Returns:
        One pointer-jumping count per round.
    """
    return [(max(blocks >> (r // 2), 1) - 1).bit_length() for r in range(2 * doublings)]


def _union_find(neighbours: Tensor, schedule: list[int]) -> Tensor:
    """Roots of the blocks after the hooking rounds of ``schedule`` (see :func:`_union_find_schedule`).

    Args:
        neighbours: ``(8, M)`` from :func:`_block_graph`.
        schedule: pointer-jumping steps per round.

    Returns:
        ``(M,)`` int64: each block's root (the smallest block index of its tree; a star forest).
    """
    size = neighbours.shape[1]
    parents = torch.arange(size, device=neighbours.device)
    # the 8 neighbour roots are read in int32 where the indices fit (half the memory traffic, ~20 % faster on the CPU)
    compact = torch.int32 if size <= torch.iinfo(torch.int32).max else torch.int64
    for jumps in schedule:
        roots = torch.gather(parents.to(compact).expand(8, -1), 1, neighbours)  # the 8 neighbours' roots (or the own)
        roots = torch.minimum(roots[:4], roots[4:])
        roots = torch.minimum(roots[:2], roots[2:])
        smallest = torch.minimum(roots[0], roots[1]).long()
        # each root: the smallest root adjacent to any block of its tree, if smaller than itself
        parents = parents.scatter_reduce(0, parents, smallest, reduce="amin", include_self=True)
        for _ in range(jumps):
            parents = torch.gather(parents, 0, parents)
    return parents


def connected_components(mask: Tensor) -> Tensor:
    """Exact 8-connected component labels, with a fixed number of steps (no host synchronisation).

    ``2 · floor(log2 blocks)`` union-find rounds on the 2 × 2 blocks (:func:`_union_find_schedule`).

    Args:
        mask: ``(N, 1, H, W)`` bool (or {0, 1}) foreground.

    Returns:
        ``(N, 1, H, W)`` int64 labels, 0 on the background, else 1 + the smallest 2 × 2 block index
        of the component in raster order over the flattened batch: the labels of
        ``kornia.contrib.connected_components_union_find``.
    """
    n, _, h, w = mask.shape
    _, neighbours = _block_graph(mask[:, 0] != 0)
    blocks = ((h + 1) // 2) * ((w + 1) // 2)
    roots = _union_find(neighbours, _union_find_schedule(blocks, blocks.bit_length() - 1))
    return _to_pixels(roots + 1, n, h, w) * (mask != 0)


def _to_pixels(per_block: Tensor, n: int, h: int, w: int) -> Tensor:
    """``(N·⌈H/2⌉·⌈W/2⌉,)`` block values -> ``(N, 1, H, W)``, each value on its block's 2 × 2 pixels."""
    hb, wb = (h + 1) // 2, (w + 1) // 2
    pixels = per_block.view(n, hb, 1, wb, 1).expand(n, hb, 2, wb, 2).reshape(n, 2 * hb, 2 * wb)
    return pixels[:, None, :h, :w]


def _drop_small_components(mask: Tensor, min_pixels: float) -> Tensor:
    """Zero the 8-connected components of the ``(N, 1, H, W)`` bool mask with fewer than ``min_pixels`` pixels.

    Union-find rounds only until every tree is either a whole component or at least
    ``min_pixels`` pixels large (see :func:`_union_find_schedule`); areas by ``scatter_add_`` into
    a fixed-size tensor (``bincount`` on CUDA reads the input's maximum).
    """
    if min_pixels <= 1:
        return mask
    n, _, h, w = mask.shape
    pixels, neighbours = _block_graph(mask[:, 0])
    blocks = pixels[0].numel()
    needed = math.ceil(min_pixels)  # areas are integers
    doublings = min((needed - 1).bit_length(), blocks.bit_length() - 1)  # 2^k >= needed, or complete labels
    roots = _union_find(neighbours, _union_find_schedule(blocks, doublings))
    areas = torch.zeros_like(roots).scatter_add_(0, roots, pixels.view(-1))
    keep = torch.gather(areas, 0, roots) >= needed
    return mask & _to_pixels(keep, n, h, w)


def motion_masks(clips: Tensor, config: MotionMaskConfig | None = None) -> Tensor:
    """Masks of the independently moving pixels of each clip's key frame (frame ``T // 2``).

    Args:
        clips: ``(B, T, 3, H, W)`` float RGB in [0, 1], ``T >= 3`` (frames on both sides of the key frame).
        config: thresholds and clean-up sizes (defaults: :class:`MotionMaskConfig`).

    Returns:
        ``(B, 1, H, W)`` float masks in {0, 1}, on the clips' device.
    """
    config = config or MotionMaskConfig()
    return _clean_up(_residual_motion(clips) > config.threshold, config).float()


def _residual_motion(clips: Tensor) -> Tensor:
    """``(B, 1, H, W)`` grey-level residual of the key frame once the camera's translation is removed (steps 1–3)."""
    b, t, c, h, w = clips.shape
    if t < 3 or c != 3:
        raise ValueError(f"motion masks need clips (B, T >= 3, 3, H, W) with frames on both sides of the key frame; got {tuple(clips.shape)}")
    key = t // 2
    grey = kornia.color.rgb_to_grayscale(clips.float())[:, :, 0]  # (B, T, H, W), BT.601 luma
    others = t - 1
    reference = grey[:, key : key + 1].expand(-1, others, -1, -1).reshape(-1, h, w)
    moving = torch.cat([grey[:, :key], grey[:, key + 1 :]], 1).reshape(-1, h, w)  # a list index copies from the host
    shift = estimate_shift(reference, moving)
    warped, valid = shift_images(moving[:, None], shift)
    residual = F.avg_pool2d((reference[:, None] - warped).abs(), 3, stride=1, padding=1, count_include_pad=False)
    residual = residual.view(b, others, h, w)
    valid = valid.view(b, others, h, w).float()
    before, after = slice(0, key), slice(key, others)

    def side_mean(part: slice) -> tuple[Tensor, Tensor]:
        weight = valid[:, part].sum(1)
        return (residual[:, part] * valid[:, part]).sum(1) / weight.clamp_min(1.0), weight > 0

    r_before, ok_before = side_mean(before)
    r_after, ok_after = side_mean(after)
    combined = torch.where(ok_before & ok_after, torch.minimum(r_before, r_after), torch.where(ok_before, r_before, r_after))
    combined = torch.where(ok_before | ok_after, combined, torch.zeros_like(combined))
    return combined[:, None]


def _clean_up(mask: Tensor, config: MotionMaskConfig) -> Tensor:
    """Step 4 after the threshold: ``(B, 1, H, W)`` bool -> opened, closed, small components dropped (bool)."""
    h, w = mask.shape[-2:]
    cleaned = _close(_open(mask, config.open_size), config.close_size)
    return _drop_small_components(cleaned, config.min_area * h * w)
