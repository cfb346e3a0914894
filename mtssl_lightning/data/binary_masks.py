"""Binary masks on the device without host synchronisation: opening, closing, connected components
and the small-component filter of the motion masks (:mod:`mtssl_lightning.data.motion`).

Nothing here reads a value back from the device or makes a size depend on the data: the masks are
computed in the DataModule before every training step, and a GPU must not wait for the host there
(``tests/host_syncs.py`` checks it on the CPU). The union-find runs a fixed, sufficient number of
rounds instead of looping until nothing changes (see :func:`_union_find_schedule`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["connected_components"]


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
