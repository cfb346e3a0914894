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
   the frame are dropped (exact 8-connectivity; both in :mod:`mtssl_lightning.data.binary_masks`).

Every step runs batched on the clips' device **without host synchronisation**: no value is read
back, no size depends on the data and no tensor is built from Python data per call (the masks
are computed in the DataModule before every training step, and a GPU must not wait for the host
there; ``tests/host_syncs.py`` checks it on the CPU).

Zoom, rotation and parallax of a static scene are not modelled and can leave residual motion
at strong edges; the opening and the component filter remove most of it on typical footage.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.color
import torch
import torch.nn.functional as F
from torch import Tensor

from mtssl_lightning.data.binary_masks import _close, _drop_small_components, _open
from mtssl_lightning.tensor_cache import tensor_cache

__all__ = ["MotionMaskConfig", "estimate_shift", "motion_masks", "shift_images"]


def _tukey(size: int, device: torch.device, taper: float = 0.25) -> Tensor:
    """``(size,)`` Tukey window: cosine tapers over ``taper / 2`` of each end, flat (1) between.

    Flat rather than Hann so that the centre of the frame (where a filmed object often is) does
    not outweigh the background in the estimate of the camera motion.
    """
    x = torch.linspace(0.0, 1.0, size, device=device, dtype=torch.float32)
    edge = taper / 2
    ramp = lambda u: 0.5 * (1 - torch.cos(torch.pi * u / edge))  # rises 0 -> 1 over [0, edge]
    return torch.where(x < edge, ramp(x), torch.where(x > 1 - edge, ramp(1 - x), torch.ones_like(x)))


@tensor_cache(maxsize=16)
def _window(h: int, w: int, device: torch.device) -> Tensor:
    """``(h, w)`` separable Tukey window, made once per size and device (not on every call)."""
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
