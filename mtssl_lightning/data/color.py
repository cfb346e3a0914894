"""Colour-space ops on the device (batched, differentiable): Lab and the harmonized grey input.

``rgb_to_lab`` is Kornia's formula (D65, 2° observer; the same constants and order of operations,
so the same values) with its constant tensors made once per device and dtype: Kornia's builds them
from Python lists on every call, which on a GPU is a blocking host-to-device copy per call (the
task samplers convert every training batch). It always computes in float32 or wider, whatever the
autocast state (Lab feeds colorization's targets).
"""

from __future__ import annotations

import kornia.color
import torch
from torch import Tensor

from mtssl_lightning.tensor_cache import tensor_cache

#: sRGB (linear) -> CIE XYZ, D65 white point (Kornia's ``rgb_to_xyz`` matrix)
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
#: D65 reference white in XYZ
D65_WHITE = (0.95047, 1.0, 1.08883)


@tensor_cache(maxsize=16)
def _lab_constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    kernel = torch.tensor(RGB_TO_XYZ, device=device, dtype=dtype)
    white = torch.tensor(D65_WHITE, device=device, dtype=dtype)[:, None, None]
    return kernel, white


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB ``(*, 3, H, W)`` in [0, 1] -> CIE Lab (D65, 2°): L in [0, 100], a/b roughly [-128, 127].

    Computed in float32 (float64 stays float64) with autocast off.
    """
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab needs (*, 3, H, W) images, got shape {tuple(rgb.shape)}")
    dtype = torch.promote_types(rgb.dtype, torch.float32)
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        rgb = rgb.to(dtype)
        kernel, white = _lab_constants(rgb.device, dtype)
        linear = torch.where(rgb > 0.04045, torch.pow(((rgb + 0.055).clamp(min=0.0) / 1.055), 2.4), rgb / 12.92)
        xyz = torch.einsum("oi, ...ihw -> ...ohw", kernel, linear) / white
        threshold = 0.008856
        xyz = torch.where(xyz > threshold, torch.pow(xyz.clamp(min=threshold), 1 / 3.0), 7.787 * xyz + 4.0 / 29.0)
        x, y, z = xyz[..., 0, :, :], xyz[..., 1, :, :], xyz[..., 2, :, :]
        return torch.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], dim=-3)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab ``(*, 3, H, W)`` -> sRGB in [0, 1] (clipped to the gamut); for pictures, not a hot path."""
    return kornia.color.lab_to_rgb(lab, clip=True)


def lab_gray(rgb: Tensor) -> Tensor:
    """The paper's "input harmonization": Lab L / 100 replicated to 3 channels, ``(*, 3, H, W)``.

    Scaled to [0, 1] so that it enters the trunk exactly like RGB does.
    """
    lightness = rgb_to_lab(rgb)[..., :1, :, :] / 100.0
    return lightness.expand(*lightness.shape[:-3], 3, *lightness.shape[-2:]).contiguous()
