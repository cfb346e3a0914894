"""Drawing helpers for the tasks' ``pictures`` (W&B media, notebooks): batched tensor ops only.

Everything works on ``(N, 3, H, W)`` float RGB in [0, 1] on any device; the tasks move the
finished picture to the CPU. Layout conventions (relied on by the tests and handy when reading a
picture back): :func:`grid` puts tile ``(r, c)`` of an ``R × C`` grid of ``h × w`` tiles at rows
``padding + r·(h + padding)`` and columns ``padding + c·(w + padding)`` (see :func:`tile`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: outline colours: a correct prediction, a wrong one
GREEN = (0.0, 1.0, 0.0)
RED = (1.0, 0.0, 0.0)
#: overlay colours of motion masks: the target, the prediction
TARGET_COLOUR = (0.0, 0.8, 1.0)
PREDICTION_COLOUR = (1.0, 0.2, 0.8)
#: background: the space between tiles and around cells, neutral frames
BACKGROUND = 0.85
#: empty cells (e.g. the unused cells of a relative-position canvas)
EMPTY = 0.6
#: pixels between the tiles of a :func:`grid`
PADDING = 2

Colour = Sequence[float] | Tensor

__all__ = [
    "BACKGROUND",
    "EMPTY",
    "GREEN",
    "PADDING",
    "PREDICTION_COLOUR",
    "RED",
    "TARGET_COLOUR",
    "as_rgb",
    "colour_tensor",
    "grid",
    "outline",
    "overlay",
    "tile",
]


def as_rgb(images: Tensor) -> Tensor:
    """``(N, 1 or 3, H, W)`` images (float in [0, 1] or uint8) -> ``(N, 3, H, W)`` float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"pictures need (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return images.expand(-1, 3, -1, -1).clamp(0.0, 1.0)


def colour_tensor(colour: Colour, count: int, device: torch.device) -> Tensor:
    """One colour ``(3,)`` or one per image ``(N, 3)`` -> ``(N, 3, 1, 1)`` float32 on ``device``."""
    value = torch.as_tensor(colour, dtype=torch.float32, device=device)
    if value.shape == (3,):
        value = value.expand(count, 3)
    if value.shape != (count, 3):
        raise ValueError(f"colour must be (3,) or ({count}, 3), got shape {tuple(value.shape)}")
    return value[:, :, None, None]


def outline(images: Tensor, colour: Colour, width: int = 2) -> Tensor:
    """Frame every image with a ``width``-pixel border of ``colour``, drawn *outside* the image.

    ``(N, 3, H, W)`` -> ``(N, 3, H + 2·width, W + 2·width)``; the image's own pixels are kept
    unchanged in the middle. ``colour`` is one RGB triple or one per image ``(N, 3)``.
    """
    images = as_rgb(images)
    count, _, height, width_px = images.shape
    out = colour_tensor(colour, count, images.device).expand(-1, -1, height + 2 * width, width_px + 2 * width).clone()
    out[:, :, width : width + height, width : width + width_px] = images
    return out


def overlay(images: Tensor, masks: Tensor, colour: Colour, alpha: float = 0.5) -> Tensor:
    """Tint ``images`` with ``colour`` where ``masks`` is set: ``(1 - α·m)·x + α·m·colour``.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        masks: ``(N, 1, h, w)`` in [0, 1] (binary or soft); resized to ``(H, W)`` with
            nearest-neighbour interpolation when the sizes differ (exact block repeat for an
            integer factor, e.g. a 1/4-resolution target).
        colour: one RGB triple or one per image ``(N, 3)``.
        alpha: opacity of the tint.
    """
    images = as_rgb(images)
    masks = masks.to(device=images.device, dtype=torch.float32)
    if masks.ndim != 4 or masks.shape[:2] != (images.shape[0], 1):
        raise ValueError(f"masks must be (N, 1, h, w) for {tuple(images.shape)} images, got {tuple(masks.shape)}")
    if masks.shape[-2:] != images.shape[-2:]:
        masks = F.interpolate(masks, size=images.shape[-2:], mode="nearest")
    weight = alpha * masks.clamp(0.0, 1.0)
    return images * (1.0 - weight) + colour_tensor(colour, images.shape[0], images.device) * weight


def grid(tiles: Tensor, padding: int = PADDING, pad_value: float = BACKGROUND) -> Tensor:
    """One picture of an ``R × C`` grid of equally sized tiles: ``(R, C, 3, h, w)`` -> ``(3, H, W)``.

    ``H = R·(h + padding) + padding``, ``W = C·(w + padding) + padding``; tile ``(r, c)`` is at
    :func:`tile` ``(picture, r, c, h, w, padding)``. ``(N, 3, h, w)`` is read as one row.
    """
    if tiles.ndim == 4:
        tiles = tiles[None]
    if tiles.ndim != 5 or tiles.shape[2] not in (1, 3):
        raise ValueError(f"grid needs (R, C, 3, h, w) or (N, 3, h, w) tiles, got shape {tuple(tiles.shape)}")
    rows, cols = tiles.shape[:2]
    height, width = tiles.shape[-2:]
    tiles = as_rgb(tiles.flatten(0, 1))
    # pad right and bottom of every tile, lay them out, then pad the top-left edge once
    padded = F.pad(tiles, (0, padding, 0, padding), value=pad_value)
    padded = padded.view(rows, cols, 3, height + padding, width + padding)
    sheet = padded.permute(2, 0, 3, 1, 4).reshape(3, rows * (height + padding), cols * (width + padding))
    return F.pad(sheet, (padding, 0, padding, 0), value=pad_value)


def tile(picture: Tensor, row: int, col: int, height: int, width: int, padding: int = PADDING) -> Tensor:
    """Tile ``(row, col)`` (``(3, height, width)``) of a picture made by :func:`grid`."""
    top, left = padding + row * (height + padding), padding + col * (width + padding)
    return picture[:, top : top + height, left : left + width]
