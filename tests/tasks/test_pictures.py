"""Tasks' ``pictures``: layout, range and keys on real sample-data batches, checked against the
batch geometry (RP boxes), an independent Lab conversion (skimage), and hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.color
import torch
import torch.nn.functional as F
from toy_tasks import Brightness

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.tasks import Colorization, Exemplar, MotionSegmentation, RelativePosition
from mtssl_lightning.tasks import pictures as draw
from mtssl_lightning.trunks import ResNetV2

PATCH, GAP, JITTER = 16, 4, 2
BORDER = 1  # max(1, PATCH // 16): the frame around every RP cell
SLOT = PATCH + 2 * BORDER
SIZE, VIEWS, VIEW_SIZE, STRIDE = 48, 3, 32, 4
#: canvas cell (row, col) of the neighbour for labels 0..7, written out from the documented
#: convention (0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 bottom, 7 bottom-right)
LABEL_CELL = {0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (1, 0), 4: (1, 2), 5: (2, 0), 6: (2, 1), 7: (2, 2)}
KEYS = {"rp": "pairs", "col": "colorization", "ex": "views", "ms": "masks"}
# augmentation off (see test_exemplar.py): each view is the whole image
IDENTITY = {
    "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "rotation": 0.0, "flip_p": 0.0, "jitter_p": 0.0, "grey_p": 0.0, "blur_p": 0.0
}


def _tasks() -> dict:
    return {
        "rp": RelativePosition(batch_size=4, image_size=64, patch_size=PATCH, gap=GAP, jitter=JITTER, pairs="all", hidden=16),
        "col": Colorization(batch_size=4, image_size=SIZE, head_channels=8),
        "ex": Exemplar(batch_size=4, image_size=SIZE, views=VIEWS, view_size=VIEW_SIZE, hidden=16, embedding_dim=8),
        "ms": MotionSegmentation(batch_size=4, image_size=SIZE, head_channels=8),
    }


@pytest.fixture(scope="module")
def setup() -> tuple[MultiTaskSSL, dict, dict, dict]:
    """A tiny four-task model, one validation batch of the sample photos / video (workers off),
    its task batches and the model's real predictions on them."""
    torch.manual_seed(0)
    model = MultiTaskSSL(tasks=_tasks(), trunk=ResNetV2("tiny", width=0.125)).eval()
    data = MultiTaskDataModule(num_workers=0, val_samples=8, samplers=model.task_samplers())
    data.setup("validate")
    raw, *_ = next(iter(data.val_dataloader()))
    batches = data.build(raw, training=False)
    with torch.no_grad():
        predictions = {name: model.task_forward(name, batch) for name, batch in batches.items()}
    return model, raw, batches, predictions


def _ring(canvas: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """``(3, n)`` pixels of the frame around RP canvas cell ``(row, col)``."""
    slot = canvas[:, row * SLOT : (row + 1) * SLOT, col * SLOT : (col + 1) * SLOT]
    inner = torch.zeros(SLOT, SLOT, dtype=torch.bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = True
    return slot[:, ~inner]


def _cell(canvas: torch.Tensor, row: int, col: int) -> torch.Tensor:
    top, left = row * SLOT + BORDER, col * SLOT + BORDER
    return canvas[:, top : top + PATCH, left : left + PATCH]


def _is_colour(pixels: torch.Tensor, colour) -> bool:
    return bool(torch.all(pixels == torch.tensor(colour, dtype=pixels.dtype)[:, None]))


# ------------------------------------------------------------------------------------------
# utilities
# ------------------------------------------------------------------------------------------


def test_grid_layout_outline_and_overlay_by_hand() -> None:
    tiles = torch.rand(2, 3, 3, 5, 7)
    sheet = draw.grid(tiles, padding=2)
    assert sheet.shape == (3, 2 * 7 + 2, 3 * 9 + 2)
    for r in range(2):
        for c in range(3):
            assert torch.equal(draw.tile(sheet, r, c, 5, 7, padding=2), tiles[r, c])
    assert torch.all(sheet[:, :2] == draw.BACKGROUND) and torch.all(sheet[:, :, 9:11] == draw.BACKGROUND)
    one = draw.grid(torch.rand(1, 3, 4, 4))  # a single image keeps its padding (unlike make_grid)
    assert one.shape == (3, 4 + 2 * draw.PADDING, 4 + 2 * draw.PADDING)

    images = torch.rand(2, 3, 4, 5)
    framed = draw.outline(images, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], width=2)
    assert framed.shape == (2, 3, 8, 9)
    assert torch.equal(framed[:, :, 2:6, 2:7], images)
    assert torch.all(framed[0, :, 0] == torch.tensor([1.0, 0.0, 0.0])[:, None])
    assert torch.all(framed[1, :, :, -1] == torch.tensor([0.0, 0.0, 1.0])[:, None])

    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    tinted = draw.overlay(images[:1], masks, (0.0, 1.0, 0.0), alpha=0.25)
    # nearest-neighbour resizing, by hand: output pixel (i, j) reads mask pixel (floor(i·2/4), floor(j·2/5))
    rows, cols = torch.arange(4) * 2 // 4, torch.arange(5) * 2 // 5
    green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    expected = torch.where(masks[0, 0][rows][:, cols].bool(), 0.75 * images[:1] + 0.25 * green, images[:1])
    torch.testing.assert_close(tinted, expected)


def test_default_pictures_are_a_row_of_inputs() -> None:
    task = Brightness(batch_size=3, image_size=16)
    batch = task.build(torch.rand(3, 3, 16, 16))
    picture = task.pictures(batch, max_items=2)["inputs"]
    assert picture.shape == (3, 16 + 2 * draw.PADDING, 2 * 16 + 3 * draw.PADDING)
    for i in range(2):
        torch.testing.assert_close(draw.tile(picture, 0, i, 16, 16), batch.inputs[i].clamp(0, 1))


# ------------------------------------------------------------------------------------------
# every task: keys, shapes, range, device, no side effects
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KEYS))
def test_pictures_keys_shapes_and_range(setup, name: str) -> None:
    model, _, batches, predictions = setup
    task, batch = model.tasks[name], batches[name]
    before = batch.inputs.clone()
    rp_side = 3 * SLOT
    expected = {  # (rows, columns, tile height, tile width) per task, without / with a prediction
        "rp": ((1, 4, rp_side, rp_side), (1, 4, rp_side, rp_side)),
        "col": ((4, 2, SIZE, SIZE), (4, 3, SIZE, SIZE)),
        "ex": ((4, VIEWS, VIEW_SIZE + 2, VIEW_SIZE + 2), (4, VIEWS, VIEW_SIZE + 2, VIEW_SIZE + 2)),
        "ms": ((4, 2, SIZE, SIZE), (4, 3, SIZE, SIZE)),
    }[name]
    for prediction, (rows, cols, h, w) in zip((None, predictions[name]), expected):
        pictures = task.pictures(batch, prediction)
        assert set(pictures) == {KEYS[name]}
        picture = pictures[KEYS[name]]
        pad = draw.PADDING
        assert picture.shape == (3, rows * (h + pad) + pad, cols * (w + pad) + pad)
        assert picture.dtype == torch.float32 and picture.device.type == "cpu" and not picture.requires_grad
        assert float(picture.min()) >= 0.0 and float(picture.max()) <= 1.0
    assert torch.equal(batch.inputs, before)
    fewer = task.pictures(batch, predictions[name], max_items=2)[KEYS[name]]
    assert fewer.shape[1:] != picture.shape[1:]


# ------------------------------------------------------------------------------------------
# relative position
# ------------------------------------------------------------------------------------------


def test_relative_position_patches_land_in_the_labelled_cell(setup) -> None:
    """Without colour drop or down-sampling each shown patch is an exact crop of the photo: the
    canvas centre is the anchor's box, the labelled cell the neighbour's box (from ``batch.boxes``)."""
    _, raw, _, _ = setup
    torch.manual_seed(1)
    task = RelativePosition(
        batch_size=4, image_size=64, patch_size=PATCH, gap=GAP, jitter=JITTER, pairs="all",
        downsample_fraction=0.0, colour="none", hidden=16,
    )
    images = raw["rp"].images.float() / 255
    batch = task.build(images)
    pairs = batch.labels.shape[0]
    picture = task.pictures(batch, max_items=pairs)["pairs"]  # every pair, in order
    assert picture.shape[-1] == pairs * (3 * SLOT + draw.PADDING) + draw.PADDING
    assert set(batch.labels.tolist()) == set(range(8))
    for i in range(pairs):
        canvas = draw.tile(picture, 0, i, 3 * SLOT, 3 * SLOT)
        image = images[batch.pair_image[i]]
        anchor, neighbour = batch.pair_cells[i].tolist()
        x0, y0, x1, y1 = batch.boxes[batch.pair_image[i], anchor].tolist()
        torch.testing.assert_close(_cell(canvas, 1, 1), image[:, y0:y1, x0:x1], rtol=0, atol=1e-6)
        x0, y0, x1, y1 = batch.boxes[batch.pair_image[i], neighbour].tolist()
        row, col = LABEL_CELL[int(batch.labels[i])]
        torch.testing.assert_close(_cell(canvas, row, col), image[:, y0:y1, x0:x1], rtol=0, atol=1e-6)
        # the 3x3 image lattice: the neighbour's cell relative to the centre anchor is the canvas cell
        assert (row, col) == divmod(neighbour, 3) and anchor == 4
        for r, c in set(LABEL_CELL.values()) - {(row, col)}:
            assert torch.all(_cell(canvas, r, c) == draw.EMPTY)
        for r in range(3):
            for c in range(3):
                assert torch.all(_ring(canvas, r, c) == draw.BACKGROUND)  # no prediction, no outline


def test_relative_position_outline_green_when_right_red_when_wrong(setup) -> None:
    model, _, batches, predictions = setup
    task, batch = model.tasks["rp"], batches["rp"]
    pairs = batch.labels.shape[0]
    guess = batch.labels.clone()
    guess[1::2] = (guess[1::2] + 3) % 8  # odd pairs wrong
    logits = F.one_hot(guess, 8).float() * 5.0
    picture = task.pictures(batch, logits, max_items=pairs)["pairs"]
    for i in range(pairs):
        canvas = draw.tile(picture, 0, i, 3 * SLOT, 3 * SLOT)
        true_cell, guessed_cell = LABEL_CELL[int(batch.labels[i])], LABEL_CELL[int(guess[i])]
        for r in range(3):
            for c in range(3):
                ring = _ring(canvas, r, c)
                if (r, c) == guessed_cell:
                    assert _is_colour(ring, draw.GREEN if i % 2 == 0 else draw.RED), (i, r, c)
                else:
                    assert torch.all(ring == draw.BACKGROUND), (i, r, c)
        torch.testing.assert_close(_cell(canvas, *true_cell), batch.inputs[batch.second[i]])

    # the real model's prediction: one coloured frame per shown pair, green exactly when argmax is right
    shown = torch.linspace(0, pairs - 1, 4).round().long()
    picture = task.pictures(batch, predictions["rp"])["pairs"]
    right = predictions["rp"][shown].argmax(1) == batch.labels[shown]
    for k, i in enumerate(shown.tolist()):
        canvas = draw.tile(picture, 0, k, 3 * SLOT, 3 * SLOT)
        cell = LABEL_CELL[int(predictions["rp"][i].argmax())]
        assert _is_colour(_ring(canvas, *cell), draw.GREEN if right[k] else draw.RED)
        torch.testing.assert_close(_cell(canvas, 1, 1), batch.inputs[batch.first[i]])


# ------------------------------------------------------------------------------------------
# colorization
# ------------------------------------------------------------------------------------------


def _lab_images(lightness: np.ndarray, ab: list[tuple[float, float]]) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` made by skimage from per-pixel L ``(B, H, W)`` and one ab per image."""
    out = []
    for light, (a, b) in zip(lightness, ab):
        lab = np.stack([light, np.full_like(light, a), np.full_like(light, b)], -1)
        rgb = skimage.color.lab2rgb(lab)
        assert rgb.min() > 0.0 and rgb.max() < 1.0, "test colours must be inside the sRGB gamut"
        out.append(torch.from_numpy(rgb).permute(2, 0, 1).float())
    return torch.stack(out)


def test_colorization_columns_against_skimage() -> None:
    """Photos with one ab per image: the truth column is the photo again (Lab→RGB round trip), the
    grey column is skimage's L / 100, and one-hot logits on bin c decode to (L, c) by skimage."""
    rng = np.random.default_rng(0)
    lightness = rng.uniform(35.0, 75.0, size=(3, SIZE, SIZE))
    chroma = [(15.0, -20.0), (-10.0, 25.0), (5.0, 5.0)]
    images = _lab_images(lightness, chroma)
    task = Colorization(batch_size=3, image_size=SIZE, head_channels=8).eval()
    batch = task.build(images)
    picture = task.pictures(batch)["colorization"]
    assert picture.shape == (3, 3 * (SIZE + draw.PADDING) + draw.PADDING, 2 * (SIZE + draw.PADDING) + draw.PADDING)
    for r in range(3):
        grey = torch.from_numpy(skimage.color.rgb2lab(images[r].permute(1, 2, 0).double().numpy())[..., 0] / 100)
        torch.testing.assert_close(draw.tile(picture, r, 0, SIZE, SIZE), grey.float().expand(3, -1, -1), rtol=0, atol=1e-3)
        torch.testing.assert_close(draw.tile(picture, r, 1, SIZE, SIZE), images[r], rtol=0, atol=3 / 255)

    centre = torch.tensor([10.0, -10.0])
    q = int(torch.cdist(centre[None], task.centres).argmin())
    assert torch.equal(task.centres[q], centre)
    h = SIZE // 4
    logits = F.one_hot(torch.full((3, h, h), q), task.num_bins).permute(0, 3, 1, 2).float() * 100.0
    picture = task.pictures(batch, logits)["colorization"]
    expected = _lab_images(lightness, [(10.0, -10.0)] * 3)
    for r in range(3):
        torch.testing.assert_close(draw.tile(picture, r, 1, SIZE, SIZE), expected[r], rtol=0, atol=3 / 255)
        torch.testing.assert_close(draw.tile(picture, r, 2, SIZE, SIZE), images[r], rtol=0, atol=3 / 255)


def test_colorization_truth_column_is_close_to_the_photo(setup) -> None:
    """On real photos only the chroma resolution (1/4) is lost: the truth column stays close."""
    model, raw, batches, predictions = setup
    picture = model.tasks["col"].pictures(batches["col"], predictions["col"])["colorization"]
    photos = raw["col"].images.float() / 255
    for r in range(4):
        error = (draw.tile(picture, r, 2, SIZE, SIZE) - photos[r]).abs().mean()
        assert error < 0.03, float(error)


# ------------------------------------------------------------------------------------------
# exemplar
# ------------------------------------------------------------------------------------------


def test_exemplar_rows_are_images_and_frames_show_retrieval(setup) -> None:
    _, raw, _, _ = setup
    images = F.interpolate(raw["ex"].images.float() / 255, size=(VIEW_SIZE, VIEW_SIZE), mode="area")
    task = Exemplar(batch_size=4, image_size=VIEW_SIZE, views=VIEWS, view_size=VIEW_SIZE, **IDENTITY)
    batch = task.build(images)
    width = 1  # max(1, VIEW_SIZE // 32)
    side = VIEW_SIZE + 2 * width
    picture = task.pictures(batch)["views"]
    for r in range(4):
        for c in range(VIEWS):
            framed = draw.tile(picture, r, c, side, side)
            torch.testing.assert_close(framed[:, width:-width, width:-width], images[r], rtol=0, atol=1e-4)
            assert torch.all(framed[:, 0] == draw.BACKGROUND)

    # embeddings by hand: views of one image close together, except view 0 of image 1, moved next
    # to image 2 (its nearest other view is of image 2: red); all other views find their own image
    labels = batch.labels
    spread = torch.zeros(labels.shape[0], 2)
    spread[:, 0] = 0.01 * torch.arange(labels.shape[0])
    embeddings = torch.cat([F.one_hot(labels, 4).float(), spread], 1)
    embeddings[VIEWS] = torch.cat([F.one_hot(torch.tensor(2), 4).float(), torch.tensor([0.0, 0.5])])
    picture = task.pictures(batch, embeddings)["views"]
    for r in range(4):
        for c in range(VIEWS):
            framed = draw.tile(picture, r, c, side, side)
            assert _is_colour(framed[:, 0], draw.RED if (r, c) == (1, 0) else draw.GREEN), (r, c)


# ------------------------------------------------------------------------------------------
# motion segmentation
# ------------------------------------------------------------------------------------------


def test_motion_overlays_change_exactly_the_masked_pixels(setup) -> None:
    model, _, batches, predictions = setup
    task, batch = model.tasks["ms"], batches["ms"]
    logits = predictions["ms"]
    picture = task.pictures(batch, logits)["masks"]
    target = batch.targets.repeat_interleave(STRIDE, 2).repeat_interleave(STRIDE, 3)[:, 0].bool()  # (B, H, W)
    predicted = (torch.sigmoid(logits) > 0.5).repeat_interleave(STRIDE, 2).repeat_interleave(STRIDE, 3)[:, 0]
    assert target.any() and not target.all(), "the sample clips should have some moving pixels"
    for r in range(4):
        frame = draw.tile(picture, r, 0, SIZE, SIZE)
        torch.testing.assert_close(frame, batch.inputs[r])
        for col, mask, colour in ((1, target[r], draw.TARGET_COLOUR), (2, predicted[r], draw.PREDICTION_COLOUR)):
            tinted = draw.tile(picture, r, col, SIZE, SIZE)
            assert torch.equal((tinted != frame).any(0), mask), (r, col)
            blend = 0.5 * frame + 0.5 * torch.tensor(colour).view(3, 1, 1)
            torch.testing.assert_close(tinted[:, mask], blend[:, mask])

    # hand-made logits: the left half of every frame moving
    half = torch.full_like(logits, -4.0)
    half[..., : half.shape[-1] // 2] = 4.0
    picture = task.pictures(batch, half)["masks"]
    for r in range(4):
        changed = (draw.tile(picture, r, 2, SIZE, SIZE) != draw.tile(picture, r, 0, SIZE, SIZE)).any(0)
        assert changed[:, : SIZE // 2].all() and not changed[:, SIZE // 2 :].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pictures_of_cuda_batches_come_back_on_the_cpu(setup) -> None:
    model, raw, _, _ = setup
    model = MultiTaskSSL(tasks=_tasks(), trunk=ResNetV2("tiny", width=0.125)).eval().cuda()
    on_device = {name: type(sub)(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in vars(sub).items()}) for name, sub in raw.items()}
    batches = MultiTaskDataModule(samplers=model.task_samplers()).build(on_device, training=False)
    with torch.no_grad():
        for name, batch in batches.items():
            assert batch.inputs.is_cuda
            picture = model.tasks[name].pictures(batch, model.task_forward(name, batch))[KEYS[name]]
            assert picture.device.type == "cpu" and 0.0 <= float(picture.min()) <= float(picture.max()) <= 1.0
