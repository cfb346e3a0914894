"""Drawing helpers for the tasks' ``pictures`` (W&B media, notebooks), on torchvision's ``make_grid`` and
``draw_segmentation_masks`` where they fit.

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
from torchvision.utils import draw_segmentation_masks, make_grid

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

    (Not ``torchvision.utils.draw_bounding_boxes``: it draws over the image's own border pixels,
    and a picture of a task's input should show every pixel the trunk saw.)

    ``(N, 3, H, W)`` -> ``(N, 3, H + 2·width, W + 2·width)``; the image's own pixels are kept
    unchanged in the middle. ``colour`` is one RGB triple or one per image ``(N, 3)``.
    """
    images = as_rgb(images)
    count, _, height, width_px = images.shape
    out = colour_tensor(colour, count, images.device).expand(-1, -1, height + 2 * width, width_px + 2 * width).clone()
    out[:, :, width : width + height, width : width + width_px] = images
    return out


def overlay(images: Tensor, masks: Tensor, colour: Colour, alpha: float = 0.5) -> Tensor:
    """Tint ``images`` with ``colour`` where ``masks`` is set: ``(1 - α)·x + α·colour`` there, ``x`` elsewhere.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        masks: ``(N, 1, h, w)``, binary (a value ≥ 0.5 counts as set); resized to ``(H, W)`` with
            nearest-neighbour interpolation when the sizes differ (exact block repeat for an
            integer factor, e.g. a 1/4-resolution target).
        colour: one RGB triple in [0, 1] (torchvision takes 8-bit colours: ``round(255·c)``).
        alpha: opacity of the tint.

    Each image is drawn by ``torchvision.utils.draw_segmentation_masks`` (one image per call:
    a few pictures every few hundred steps, not a hot path).
    """
    images = as_rgb(images)
    masks = masks.to(device=images.device, dtype=torch.float32)
    if masks.ndim != 4 or masks.shape[:2] != (images.shape[0], 1):
        raise ValueError(f"masks must be (N, 1, h, w) for {tuple(images.shape)} images, got {tuple(masks.shape)}")
    if masks.shape[-2:] != images.shape[-2:]:
        masks = F.interpolate(masks, size=images.shape[-2:], mode="nearest")
    rgb = tuple(round(255 * float(c)) for c in colour)
    return torch.stack([draw_segmentation_masks(x, m >= 0.5, alpha=alpha, colors=rgb) for x, m in zip(images, masks)])


def grid(tiles: Tensor, padding: int = PADDING, pad_value: float = BACKGROUND) -> Tensor:
    """One picture of an ``R × C`` grid of equally sized tiles: ``(R, C, 3, h, w)`` -> ``(3, H, W)``.

    ``H = R·(h + padding) + padding``, ``W = C·(w + padding) + padding``; tile ``(r, c)`` is at
    :func:`tile` ``(picture, r, c, h, w, padding)``. ``(N, 3, h, w)`` is read as one row. This is
    ``torchvision.utils.make_grid``'s layout; a single tile is padded here too (``make_grid``
    returns one image without its padding, which would break that layout).
    """
    if tiles.ndim == 4:
        tiles = tiles[None]
    if tiles.ndim != 5 or tiles.shape[2] not in (1, 3):
        raise ValueError(f"grid needs (R, C, 3, h, w) or (N, 3, h, w) tiles, got shape {tuple(tiles.shape)}")
    cols = tiles.shape[1]
    tiles = as_rgb(tiles.flatten(0, 1))
    if tiles.shape[0] == 1:
        return F.pad(tiles[0], (padding,) * 4, value=pad_value)
    return make_grid(tiles, nrow=cols, padding=padding, pad_value=pad_value)


def tile(picture: Tensor, row: int, col: int, height: int, width: int, padding: int = PADDING) -> Tensor:
    """Tile ``(row, col)`` (``(3, height, width)``) of a picture made by :func:`grid`."""
    top, left = padding + row * (height + padding), padding + col * (width + padding)
    return picture[:, top : top + height, left : left + width]
