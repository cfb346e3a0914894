"""Tests of the relative-position task: geometry, crops, counter-measures, head, a learning check."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from photos import photo_tensors
from seeds import learning_seed
from torchvision.ops import roi_align

from mtssl_lightning.data.color import lab_gray
from mtssl_lightning.tasks.relative_position import (
    NEIGHBOUR_OFFSETS,
    RelativePosition,
    RelativePositionBatch,
    crop_patches,
    downsample_upsample,
    pair_table,
    required_image_size,
    sample_grid_boxes,
)


def _cell_coded_image(grid: int, patch: int, gap: int, jitter: int) -> torch.Tensor:
    """``(1, 3, S, S)`` image of the exact required size: cell (r, c) of the lattice (its
    nominal patch area grown by ``jitter``) is filled with R = (r + 1) / 8, G = (c + 1) / 8."""
    size = required_image_size(patch, gap, jitter, grid)
    image = torch.zeros(1, 3, size, size)
    image[:, 2] = 0.5
    step = patch + gap
    for r in range(grid):
        for c in range(grid):
            image[0, 0, r * step : r * step + patch + 2 * jitter, :] = (r + 1) / 8
            image[0, 1, :, c * step : c * step + patch + 2 * jitter] = (c + 1) / 8
    return image


def _decode_cell(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each ``(N, 3, p, p)`` patch from its colour (all pixels must agree)."""
    r = patches[:, 0].flatten(1)
    c = patches[:, 1].flatten(1)
    assert torch.all(r == r[:, :1]) and torch.all(c == c[:, :1]), "patch straddles cells"
    return (r[:, 0] * 8).round().long() - 1, (c[:, 0] * 8).round().long() - 1


@pytest.mark.parametrize("pairs", ["one", "all"])
@pytest.mark.parametrize(("grid", "jitter"), [(3, 0), (3, 3), (4, 2), (5, 0)])
def test_labels_follow_the_documented_geometry(pairs: str, grid: int, jitter: int) -> None:
    torch.manual_seed(0)
    patch, gap = 12, 8
    task = RelativePosition(
        batch_size=8, patch_size=patch, gap=gap, jitter=jitter, grid=grid, pairs=pairs,
        downsample_fraction=0.0, colour="none", hidden=8,
    )
    images = _cell_coded_image(grid, patch, gap, jitter).expand(8, -1, -1, -1)
    batch = task.build(images)
    assert isinstance(batch, RelativePositionBatch)
    rows, cols = _decode_cell(batch.inputs)
    # the patch cell recorded in the batch is the one whose colour we find
    assert torch.equal(rows * grid + cols, batch.patch_cell)
    dr = rows[batch.second] - rows[batch.first]
    dc = cols[batch.second] - cols[batch.first]
    expected = torch.tensor([NEIGHBOUR_OFFSETS.index((int(a), int(b))) for a, b in zip(dr, dc)])
    assert torch.equal(batch.labels, expected)
    # explicit spot check of the convention: label 1 = neighbour above, 4 = right, 5 = bottom-left
    for label, (er, ec) in {1: (-1, 0), 4: (0, 1), 5: (1, -1)}.items():
        sel = batch.labels == label
        assert torch.all(dr[sel] == er) and torch.all(dc[sel] == ec)
    # anchors have all 8 neighbours inside the grid
    assert torch.all((rows[batch.first] > 0) & (rows[batch.first] < grid - 1))
    assert torch.all((cols[batch.first] > 0) & (cols[batch.first] < grid - 1))


def test_pair_table_for_3x3() -> None:
    table = pair_table(3)
    assert table.tolist() == [[4, n, k] for k, n in enumerate([0, 1, 2, 3, 5, 6, 7, 8])]


def test_boxes_respect_gap_jitter_and_image_bounds() -> None:
    torch.manual_seed(1)
    patch, gap, jitter, grid, height, width = 20, 10, 3, 3, 120, 150
    boxes = sample_grid_boxes(4000, height, width, patch, gap, jitter, grid)
    assert boxes.shape == (4000, 9, 4) and boxes.dtype == torch.int64
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert torch.all(x1 - x0 == patch) and torch.all(y1 - y0 == patch)
    assert torch.all(x0 >= 0) and torch.all(y0 >= 0) and torch.all(x1 <= width) and torch.all(y1 <= height)
    cell = torch.arange(9)
    row, col = cell // 3, cell % 3
    step = patch + gap
    # remove the nominal lattice offset: what is left is origin + jitter, so per grid all cells
    # agree up to 2 * jitter, and the full jitter range is used
    rx, ry = x0 - col * step, y0 - row * step
    spread = torch.maximum(rx.amax(1) - rx.amin(1), ry.amax(1) - ry.amin(1))
    assert spread.max() == 2 * jitter
    g = boxes.view(4000, 3, 3, 4)
    horizontal_gap = g[:, :, 1:, 0] - g[:, :, :-1, 2]
    vertical_gap = g[:, 1:, :, 1] - g[:, :-1, :, 3]
    for gaps in (horizontal_gap, vertical_gap):
        assert gaps.min() >= gap - 2 * jitter and gaps.max() <= gap + 2 * jitter
        assert gaps.min() == gap - 2 * jitter and gaps.max() == gap + 2 * jitter  # bounds reached
    # the lattice is placed over the whole image, not only near a corner
    assert x0[:, 0].min() <= 1 and x1[:, 8].max() >= width - 1
    assert y0[:, 0].min() <= 1 and y1[:, 8].max() >= height - 1


@pytest.mark.parametrize("method", ["unfold", "roi_align"])
def test_crop_equals_slicing(method: str) -> None:
    torch.manual_seed(2)
    images = torch.rand(3, 3, 50, 60)
    n, size = 17, 11
    index = torch.randint(0, 3, (n,))
    x0 = torch.randint(0, 60 - size + 1, (n,))
    y0 = torch.randint(0, 50 - size + 1, (n,))
    crops = crop_patches(images, index, x0, y0, size, method=method)
    reference = torch.stack(
        [images[int(b), :, int(y) : int(y) + size, int(x) : int(x) + size] for b, x, y in zip(index, x0, y0)]
    )
    assert crops.shape == (n, 3, size, size)
    torch.testing.assert_close(crops, reference, rtol=0, atol=1e-6)


def test_build_patches_are_the_boxes_contents() -> None:
    torch.manual_seed(3)
    task = RelativePosition(
        patch_size=16, gap=6, jitter=3, pairs="all", downsample_fraction=0.0, colour="none", hidden=8
    )
    images = torch.rand(5, 3, 80, 90)
    batch = task.build(images)
    for i in range(batch.inputs.shape[0]):
        b, c = int(batch.patch_image[i]), int(batch.patch_cell[i])
        x0, y0, x1, y1 = batch.boxes[b, c].tolist()
        assert torch.equal(batch.inputs[i], images[b, :, y0:y1, x0:x1])


def test_all_mode_gives_each_label_once_per_image() -> None:
    torch.manual_seed(4)
    task = RelativePosition(patch_size=8, gap=2, jitter=1, pairs="all", hidden=8)
    batch = task.build(torch.rand(6, 3, 40, 40))
    assert batch.inputs.shape == (6 * 9, 3, 8, 8)  # every patch embedded once
    assert batch.labels.shape == (6 * 8,)
    assert torch.equal(batch.pair_image, torch.arange(6).repeat_interleave(8))
    assert torch.equal(batch.labels.view(6, 8).sort(dim=1).values, torch.arange(8).expand(6, 8))
    # pairs reference the patches of their own image
    assert torch.equal(batch.patch_image[batch.first], batch.pair_image)
    assert torch.equal(batch.patch_image[batch.second], batch.pair_image)


def test_one_mode_gives_one_uniform_pair_per_image() -> None:
    torch.manual_seed(5)
    task = RelativePosition(patch_size=4, gap=1, jitter=0, pairs="one", downsample_fraction=0.0, hidden=8)
    batch = task.build(torch.rand(4000, 3, 14, 14))
    assert batch.labels.shape == (4000,) and batch.inputs.shape == (8000, 3, 4, 4)  # only used patches
    assert torch.equal(batch.pair_image, torch.arange(4000))
    assert torch.all(batch.first != batch.second)
    counts = torch.bincount(batch.labels, minlength=8).float()
    assert counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500, counts


def test_downsample_upsample_matches_area_then_bilinear() -> None:
    torch.manual_seed(6)
    patches = torch.rand(4, 3, 24, 24)
    sides = torch.tensor([12, 8, 6, 3])  # divisors of 24: the roi_align down-sampling is exact area
    out = downsample_upsample(patches, sides)
    for i, s in enumerate(sides.tolist()):
        reference = F.interpolate(
            F.interpolate(patches[i : i + 1], size=s, mode="area"), size=24, mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(out[i : i + 1], reference, rtol=0, atol=1e-5)
    # sides that do not divide 24: exact area averaging, i.e. area pooling of the patch repeated
    # s times along each axis (nearest up-sampling by s, then s x s bins of 24 x 24 pixels each)
    odd_sides = torch.tensor([5, 7, 10, 23])
    odd = downsample_upsample(patches, odd_sides)
    for i, s in enumerate(odd_sides.tolist()):
        small = F.interpolate(F.interpolate(patches[i : i + 1], size=24 * s, mode="nearest"), size=s, mode="area")
        reference = F.interpolate(small, size=24, mode="bilinear", align_corners=False)
        torch.testing.assert_close(odd[i : i + 1], reference, rtol=0, atol=1e-5)
    # and they lose detail (a low-pass image keeps the mean)
    assert odd.shape == patches.shape and torch.isfinite(odd).all()
    torch.testing.assert_close(odd.mean(dim=(1, 2, 3)), patches.mean(dim=(1, 2, 3)), atol=0.03, rtol=0)
    assert (odd.std(dim=(2, 3)) < patches.std(dim=(2, 3))).all()


def test_downsample_fraction_is_applied() -> None:
    torch.manual_seed(7)
    kwargs = dict(patch_size=16, gap=4, jitter=2, pairs="all", colour="none", hidden=8)
    images = torch.rand(40, 3, 60, 60)
    batch = RelativePosition(downsample_fraction=0.33, **kwargs).build(images)
    fraction = batch.downsampled.float().mean().item()
    assert 0.25 < fraction < 0.41
    for i in range(batch.inputs.shape[0]):
        b, c = int(batch.patch_image[i]), int(batch.patch_cell[i])
        x0, y0, x1, y1 = batch.boxes[b, c].tolist()
        same = torch.equal(batch.inputs[i], images[b, :, y0:y1, x0:x1])
        assert same != bool(batch.downsampled[i])


def test_colour_drop_keeps_exactly_one_channel() -> None:
    torch.manual_seed(8)
    task = RelativePosition(
        patch_size=16, gap=4, jitter=2, pairs="all", downsample_fraction=0.0, colour="drop", hidden=8
    )
    images = torch.rand(6, 3, 60, 60)
    batch = task.build(images)
    kept = []
    for i in range(batch.inputs.shape[0]):
        b, c = int(batch.patch_image[i]), int(batch.patch_cell[i])
        x0, y0, x1, y1 = batch.boxes[b, c].tolist()
        crop = images[b, :, y0:y1, x0:x1]
        equal = [torch.equal(batch.inputs[i, ch], crop[ch]) for ch in range(3)]
        assert sum(equal) == 1
        k = equal.index(True)
        kept.append(k)
        dropped = batch.inputs[i, [ch for ch in range(3) if ch != k]]
        # near-constant noise: std ~ kept std / 100, no image structure left
        assert dropped.std(dim=(1, 2)).max() < 3 * crop[k].std() / 100
    assert set(kept) == {0, 1, 2}


@pytest.mark.parametrize("colour", ["lab_gray", "gray"])
def test_grey_colour_modes(colour: str) -> None:
    torch.manual_seed(9)
    task = RelativePosition(
        patch_size=16, gap=4, jitter=2, pairs="all", downsample_fraction=0.0, colour=colour, hidden=8
    )
    images = torch.rand(3, 3, 60, 60)
    batch = task.build(images)
    assert torch.equal(batch.inputs[:, 0], batch.inputs[:, 1]) and torch.equal(batch.inputs[:, 0], batch.inputs[:, 2])
    crops = torch.stack(
        [
            images[int(b), :, y0:y1, x0:x1]
            for b, c in zip(batch.patch_image, batch.patch_cell)
            for x0, y0, x1, y1 in [batch.boxes[int(b), int(c)].tolist()]
        ]
    )
    luminance = 0.299 * crops[:, :1] + 0.587 * crops[:, 1:2] + 0.114 * crops[:, 2:]
    expected = lab_gray(crops) if colour == "lab_gray" else luminance.expand(-1, 3, -1, -1)
    torch.testing.assert_close(batch.inputs, expected, atol=1e-5, rtol=0)
    assert task.input_mode == ("lab_gray" if colour == "lab_gray" else "rgb")


def test_input_mode_and_colour_are_consistent() -> None:
    assert RelativePosition(input_mode="lab_gray").sampler.colour == "lab_gray"
    assert RelativePosition().sampler.colour == "drop" and RelativePosition().input_mode == "rgb"
    assert RelativePosition(colour="lab_gray").input_mode == "lab_gray"
    with pytest.raises(ValueError, match="conflicts"):
        RelativePosition(input_mode="lab_gray", colour="drop")


def test_image_size_default_and_too_small_config() -> None:
    task = RelativePosition()
    assert task.sampler.required_size == 3 * 96 + 2 * 48 + 2 * 7 == 398
    assert task.image_size == 398 and task.data_request().image_size == 398
    with pytest.raises(ValueError, match=r"image_size=300.*398"):
        RelativePosition(image_size=300)


def test_small_images_error_or_upscale() -> None:
    torch.manual_seed(10)
    kwargs = dict(patch_size=16, gap=4, jitter=2, pairs="all", hidden=8)  # needs 60 px
    small = torch.rand(2, 3, 40, 50)
    with pytest.raises(ValueError, match=r"40x50.*60x60"):
        RelativePosition(small_images="error", **kwargs).build(small)
    batch = RelativePosition(small_images="upscale", **kwargs).build(small)
    assert batch.inputs.shape == (18, 3, 16, 16)
    assert batch.boxes[..., 2].max() <= 75 and batch.boxes[..., 3].max() <= 60  # 40x50 -> 60x75
    assert torch.isfinite(batch.inputs).all()


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("colour", ["drop", "lab_gray"])
def test_grey_and_rgba_inputs(channels: int, colour: str) -> None:
    torch.manual_seed(11)
    task = RelativePosition(patch_size=16, gap=4, jitter=2, pairs="all", colour=colour, hidden=8)
    batch = task.build(torch.rand(2, channels, 64, 64))
    assert batch.inputs.shape == (18, 3, 16, 16) and torch.isfinite(batch.inputs).all()
    uint8 = task.build((torch.rand(2, channels, 64, 64) * 255).to(torch.uint8))
    assert uint8.inputs.dtype == torch.float32 and uint8.inputs.max() <= 1.0
    with pytest.raises(ValueError, match="channels"):
        task.build(torch.rand(2, 2, 64, 64))


@pytest.mark.parametrize("pool", ["avg", "flatten"])
def test_forward_loss_and_gradients_reach_the_trunk(pool: str) -> None:
    from mtssl_lightning.trunks import ResNetV2

    torch.manual_seed(12)
    trunk = ResNetV2("tiny", width=0.25)
    task = RelativePosition(
        image_size=128, patch_size=32, gap=8, jitter=2, pairs="all", hidden=16, dropout=0.1, pool=pool
    )
    task.attach(trunk.out_channels, trunk.out_stride)
    batch = task.build(torch.rand(3, 3, 128, 128))
    logits = task(trunk(batch.inputs).features, batch)
    assert logits.shape == (24, 8)
    loss = task.loss(logits, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in trunk.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    metrics = task.make_metrics()
    metrics.update(*task.metric_inputs(logits, batch))
    accuracy = metrics.compute()["accuracy"]
    assert 0.0 <= float(accuracy) <= 1.0


# --------------------------------------------------------------------------------------------
# learning check on the bundled sample photos
# --------------------------------------------------------------------------------------------


def _random_crops(photos: list[torch.Tensor], per_photo: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(len(photos) * per_photo, 3, size, size)`` random square crops (30–80 % of the short
    side) resized with area-like averaging, half of them mirrored left-right (a mirrored photo is
    still a natural photo; the task derives the labels from the mirrored geometry); a loop over
    the photos only."""
    crops = []
    for photo in photos:
        height, width = photo.shape[-2:]
        side = torch.empty(per_photo).uniform_(0.3, 0.8, generator=generator) * min(height, width)
        x0 = torch.rand(per_photo, generator=generator) * (width - side)
        y0 = torch.rand(per_photo, generator=generator) * (height - side)
        rois = torch.stack([torch.zeros(per_photo), x0, y0, x0 + side, y0 + side], dim=1)
        crops.append(roi_align(photo, rois, (size, size), 1.0, sampling_ratio=0, aligned=True))
    crops = torch.cat(crops).clamp(0.0, 1.0)
    mirror = torch.rand(crops.shape[0], generator=generator) < 0.5
    return torch.where(mirror[:, None, None, None], crops.flip(-1), crops)


def _pair_accuracy(
    task: RelativePosition, trunk: torch.nn.Module, photos: list[torch.Tensor], seed: int
) -> tuple[float, int]:
    """Accuracy over 4 × 64 fixed-seed random crops of ``photos`` (8 pairs each), eval mode."""
    torch.manual_seed(seed)  # the task's grids come from the global RNG
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    with torch.no_grad():
        for _ in range(4):
            batch = task.build(_random_crops(photos, max(1, 64 // len(photos)), task.image_size, generator))
            logits = task(trunk(batch.inputs).features, batch)
            correct += int((logits.argmax(1) == batch.labels).sum())
            total += batch.labels.numel()
    return correct / total, total


@pytest.mark.slow
def test_learns_relative_position_on_sample_photos() -> None:
    """Train a tiny trunk + head from scratch for 800 steps on one core, then check pair accuracy.

    A fixed step count (not a time budget) keeps the test deterministic (patch 24, gap 6, jitter
    2, 96 px crops, grey input, 2 crops of each of the 24 training photos per step; fresh grids
    for the evaluation, chance 0.125). Spread over training seeds 0–4 (``MTSSL_LEARNING_SEED``,
    tests/seeds.py; same evaluation crops): val photos 0.253–0.273, training photos
    0.340–0.359, mean loss of the last 20 steps 1.650–1.709 (ln 8 = 2.079 at chance). The bounds
    (val ≥ 0.20, training photos ≥ 0.22, loss < 1.85) lie well outside that spread; with 2016
    pairs chance (binomial std ~0.007) lies 10 std below the val bound, so a label/geometry bug
    fails the test. (With only the nine still photos the net memorised photo content: 0.42 on
    training photos but ~0.18 on val.)
    """
    from mtssl_lightning.trunks import ResNetV2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(learning_seed())
        gen = torch.Generator().manual_seed(learning_seed())
        train_photos, val_photos = photo_tensors("train", 200), photo_tensors("val", 200)
        kwargs = dict(
            image_size=96, patch_size=24, gap=6, jitter=2, pairs="all", colour="gray", hidden=128, dropout=0.0,
            pool="flatten",
        )
        task = RelativePosition(downsample_fraction=0.2, **kwargs)
        trunk = ResNetV2("tiny", width=0.25)
        task.attach(trunk.out_channels, trunk.out_stride)
        optimizer = torch.optim.Adam(list(trunk.parameters()) + list(task.parameters()), lr=2e-3)
        start, steps, losses = time.perf_counter(), 0, []
        trunk.train(), task.train()
        while steps < 800:
            batch = task.build(_random_crops(train_photos, 2, 96, gen))
            loss = task.loss(task(trunk(batch.inputs).features, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
        train_time = time.perf_counter() - start

        trunk.eval(), task.eval()
        eval_task = RelativePosition(downsample_fraction=0.0, **kwargs)
        eval_task.head = task.head
        train_accuracy, _ = _pair_accuracy(eval_task, trunk, train_photos, seed=321)
        val_accuracy, pairs = _pair_accuracy(eval_task, trunk, val_photos, seed=123)
        print(
            f"\nrelative position learning check: {steps} steps in {train_time:.1f}s, "
            f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-20:]):.3f}, pair accuracy on fresh grids: "
            f"train photos {train_accuracy:.3f}, val photos {val_accuracy:.3f} ({pairs} pairs; chance 0.125)"
        )
        assert np.mean(losses[-20:]) < 1.85  # ln 8 = 2.08 at chance
        assert train_accuracy >= 0.22
        assert val_accuracy >= 0.20
    finally:
        torch.set_num_threads(threads)


def test_rescale_shrinks_the_whole_grid_geometry():
    task = RelativePosition()  # 96 px patches, 48 px gaps, +-7 jitter -> 398 px crops
    task.rescale(0.25)
    assert (task.sampler.patch_size, task.sampler.gap, task.sampler.jitter) == (24, 12, 2)
    assert task.image_size == task.sampler.required_size == 3 * 24 + 2 * 12 + 2 * 2
