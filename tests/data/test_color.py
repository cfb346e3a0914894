"""Lab conversions against scikit-image (an independent implementation), on real photos and random colours.

Measured (float32 input, kornia 0.9 vs skimage 0.26 in float64): max |ΔL| ≈ 1.7e-5,
|Δa| ≈ 5.9e-5, |Δb| ≈ 3.2e-5 on the sample photos and on uniform random colours; RGB round
trip error ≈ 5e-6. The tests assert 2e-4 for Lab and 2e-5 for the round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.color
import torch

from mtssl_lightning.data.color import lab_gray, lab_to_rgb, rgb_to_lab
from mtssl_lightning.data.sample import sample_images

LAB_TOL = 2e-4
ROUND_TRIP_TOL = 2e-5


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """The sample photos, subsampled 3x to keep the test fast (uint8 ``(H, W, 3)``)."""
    return [np.ascontiguousarray(im[::3, ::3]) for im in sample_images("all").values()]


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(1, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].to(torch.float32) / 255.0


def _random_colours() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float32)


def _max_abs_lab_error(rgb: torch.Tensor) -> np.ndarray:
    ours = rgb_to_lab(rgb)[0].permute(1, 2, 0).numpy().astype(np.float64)
    ref = skimage.color.rgb2lab(rgb[0].permute(1, 2, 0).to(torch.float64).numpy())
    return np.abs(ours - ref).reshape(-1, 3).max(0)


def test_rgb_to_lab_matches_skimage_on_photos(photos: list[np.ndarray]) -> None:
    worst = np.max([_max_abs_lab_error(_to_tensor(im)) for im in photos], axis=0)
    assert (worst < LAB_TOL).all(), f"max |ΔL|, |Δa|, |Δb| = {worst}"


def test_rgb_to_lab_matches_skimage_on_random_colours() -> None:
    worst = _max_abs_lab_error(_random_colours())
    assert (worst < LAB_TOL).all(), f"max |ΔL|, |Δa|, |Δb| = {worst}"


def test_round_trip(photos: list[np.ndarray]) -> None:
    for rgb in [_random_colours(), *(_to_tensor(im) for im in photos[:4])]:
        err = (lab_to_rgb(rgb_to_lab(rgb)) - rgb).abs().max().item()
        assert err < ROUND_TRIP_TOL


def test_lab_gray_is_skimage_lightness_replicated(photos: list[np.ndarray]) -> None:
    image = photos[0]
    gray = lab_gray(_to_tensor(image))[0]
    assert gray.shape == (3, *image.shape[:2])
    ref = skimage.color.rgb2lab(image)[..., 0] / 100.0
    for c in range(3):
        np.testing.assert_allclose(gray[c].numpy(), ref, atol=LAB_TOL / 100.0)
    assert 0.0 <= gray.min() and gray.max() <= 1.0 + 1e-6


def test_our_lab_equals_kornias_and_stays_float32_under_bf16_autocast() -> None:
    """``rgb_to_lab`` is Kornia's formula with cached constants: the same values (bitwise on the CPU,
    where both use einsum), also inside a bf16 autocast region (Lab feeds colorization's targets)."""
    import kornia.color

    rgb = _random_colours()
    assert torch.equal(rgb_to_lab(rgb), kornia.color.rgb_to_lab(rgb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = rgb_to_lab(rgb)
    assert under.dtype == torch.float32 and torch.equal(under, kornia.color.rgb_to_lab(rgb))
