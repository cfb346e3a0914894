"""Motion masks: shift estimation and masks on synthetic clips with known motion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtssl_lightning.data.motion import MotionMaskConfig, estimate_shift, motion_masks, shift_images

SIZE = 96


def _texture(h: int, w: int, generator: torch.Generator, blur: int = 3) -> torch.Tensor:
    """``(3, h, w)`` smooth random colour texture in [0, 1] (box-blurred noise, contrast-stretched)."""
    noise = torch.rand(1, 3, h, w, generator=generator)
    smooth = F.avg_pool2d(noise, blur, stride=1, padding=blur // 2, count_include_pad=False)[0]
    lo, hi = smooth.amin((1, 2), keepdim=True), smooth.amax((1, 2), keepdim=True)
    return (smooth - lo) / (hi - lo)


def synthetic_clip(
    frames: int = 5, pan: tuple[int, int] = (0, 0), object_step: tuple[int, int] | None = (0, 0), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip ``(T, 3, SIZE, SIZE)`` of a textured background seen by a camera panning by ``pan``
    px per frame, and (unless ``object_step`` is None) a textured 28×28 square that moves by
    ``object_step`` px per frame in the image (on its own, whatever the camera does).
    Returns the clip and the ``(1, SIZE, SIZE)`` mask of the square in the key frame."""
    g = torch.Generator().manual_seed(seed)
    margin = 40
    background = _texture(SIZE + 2 * margin, SIZE + 2 * margin, g)
    thing = _texture(28, 28, g, blur=5)
    key = frames // 2
    clip, key_mask = [], torch.zeros(1, SIZE, SIZE)
    for t in range(frames):
        y0, x0 = margin + pan[0] * (t - key), margin + pan[1] * (t - key)
        frame = background[:, y0 : y0 + SIZE, x0 : x0 + SIZE].clone()
        if object_step is not None:
            oy, ox = 34 + object_step[0] * (t - key), 34 + object_step[1] * (t - key)
            frame[:, oy : oy + 28, ox : ox + 28] = thing
            if t == key:
                key_mask[:, oy : oy + 28, ox : ox + 28] = 1.0
        clip.append(frame)
    return torch.stack(clip), key_mask


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / (a | b).sum().clamp_min(1))


@pytest.mark.parametrize("dy,dx", [(0, 0), (3, -5), (-7, 2), (12, 9)])
def test_estimate_shift_recovers_integer_translations(dy: int, dx: int) -> None:
    g = torch.Generator().manual_seed(1)
    big = _texture(140, 140, g)[0]
    reference = big[20 : 20 + SIZE, 20 : 20 + SIZE]
    # moving(y, x) = reference(y + dy, x + dx): its content must be shifted by (dy, dx)
    moving = big[20 + dy : 20 + dy + SIZE, 20 + dx : 20 + dx + SIZE]
    shift = estimate_shift(reference[None], moving[None])[0]
    torch.testing.assert_close(shift, torch.tensor([float(dy), float(dx)]), atol=0.25, rtol=0)
    aligned, valid = shift_images(moving[None, None], shift[None])
    err = (aligned - reference)[valid].abs().mean()
    assert err < 0.02


def test_shift_images_hand_case() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4)
    out, valid = shift_images(image, torch.tensor([[1.0, 0.0]]))  # down by one row
    torch.testing.assert_close(out[0, 0, 1:], image[0, 0, :3])
    assert not valid[0, 0, 0].any() and valid[0, 0, 1:].all()


# (2, -1) with a still object: the camera tracks the object, which then moves against the scene
@pytest.mark.parametrize("pan,step", [((0, 0), (2, 3)), ((1, 2), (-3, 1)), ((-2, 1), (0, -4)), ((2, -1), (0, 0))])
def test_moving_object_on_panning_background_is_found(pan: tuple[int, int], step: tuple[int, int]) -> None:
    clip, truth = synthetic_clip(pan=pan, object_step=step)
    mask = motion_masks(clip[None])[0]
    assert mask.shape == (1, SIZE, SIZE) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert iou(mask, truth) >= 0.7, iou(mask, truth)


@pytest.mark.parametrize("pan", [(0, 0), (2, -1), (-3, 3)])
def test_static_and_purely_panning_clips_give_nearly_empty_masks(pan: tuple[int, int]) -> None:
    clips = torch.stack([synthetic_clip(pan=pan, object_step=None, seed=seed)[0] for seed in (0, 3)])
    masks = motion_masks(clips)
    assert masks.mean((1, 2, 3)).max() < 0.01


def test_batched_masks_equal_one_clip_at_a_time() -> None:
    clips = torch.stack([synthetic_clip(pan=(1, 1), object_step=(2, 2), seed=s)[0] for s in range(3)])
    batched = motion_masks(clips)
    single = torch.cat([motion_masks(c[None]) for c in clips])
    assert torch.equal(batched, single)


def test_small_components_are_dropped_and_bad_config_is_refused() -> None:
    clip, truth = synthetic_clip(pan=(1, 0), object_step=(2, 2))
    assert motion_masks(clip[None], MotionMaskConfig(min_area=0.2)).sum() == 0  # the square is 8.5 % of the frame
    assert iou(motion_masks(clip[None], MotionMaskConfig(min_area=0.05))[0], truth) >= 0.7
    with pytest.raises(ValueError, match="odd"):
        MotionMaskConfig(open_size=2)
    with pytest.raises(ValueError, match="T >= 3"):
        motion_masks(clip[None, :2])
