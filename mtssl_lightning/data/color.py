"""Colour-space ops on the device (batched, differentiable): Lab and the harmonized grey input."""

from __future__ import annotations

import kornia.color
from torch import Tensor


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB ``(*, 3, H, W)`` in [0, 1] -> CIE Lab (D65, 2°): L in [0, 100], a/b roughly [-128, 127]."""
    return kornia.color.rgb_to_lab(rgb)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab ``(*, 3, H, W)`` -> sRGB in [0, 1] (clipped to the gamut)."""
    return kornia.color.lab_to_rgb(lab, clip=True)


def lab_gray(rgb: Tensor) -> Tensor:
    """The paper's "input harmonization": Lab L / 100 replicated to 3 channels, ``(*, 3, H, W)``.

    Scaled to [0, 1] so that it enters the trunk exactly like RGB does.
    """
    lightness = rgb_to_lab(rgb)[..., :1, :, :] / 100.0
    return lightness.expand(*lightness.shape[:-3], 3, *lightness.shape[-2:]).contiguous()
