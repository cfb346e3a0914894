"""VOC detection data: the three folder layouts, resizing and flips, batches, undecodable images."""

from __future__ import annotations

import pytest
import torch

from evaluation.helpers import IMAGES, SPLITS, write_voc
from mtssl_lightning.evaluation.detection.data import VOCBatch, VOCDetectionDataModule, VOCDetectionDataset


@pytest.mark.parametrize("where", ["parent", "devkit", "voc2007"])
def test_dataset_layouts_resize_and_flip(voc_root, where):
    root = {"parent": voc_root.parent, "devkit": voc_root, "voc2007": voc_root / "VOC2007"}[where]
    data = VOCDetectionDataset(root, "trainval", image_size=48, max_size=None)
    assert data.ids == SPLITS["trainval"] and len(data) == 4
    sample = data[2]  # 000009: 96 x 72 -> shorter side 48: 64 x 48, scale 2/3 on both axes
    assert sample.image.shape == (3, 48, 64) and sample.image.dtype == torch.uint8
    torch.testing.assert_close(
        sample.boxes, torch.tensor([[19, 9, 60, 71], [60, 29, 96, 72], [0, 0, 15, 20]]) * (2 / 3)
    )
    assert sample.difficult.tolist() == [False, False, True]
    # the longer side is capped by max_size: 96 x 72 with max_size 60 -> 60 x 45
    assert VOCDetectionDataset(root, "trainval", image_size=48, max_size=60)[2].image.shape == (3, 45, 60)

    flipping = VOCDetectionDataset(root, "trainval", image_size=48, max_size=None, hflip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        s = flipping[2]
        flipped = not torch.equal(s.image, sample.image)
        seen.add(flipped)
        if flipped:
            assert torch.equal(s.image, sample.image.flip(-1))
            x1, y1, x2, y2 = sample.boxes.unbind(1)
            torch.testing.assert_close(s.boxes, torch.stack([64 - x2, y1, 64 - x1, y2], 1))
        else:
            torch.testing.assert_close(s.boxes, sample.boxes)
    assert seen == {True, False}


def test_batches_are_named_and_keep_sizes(voc_root):
    dm = VOCDetectionDataModule(str(voc_root), image_size=48, max_size=80, batch_size=3, num_workers=0, hflip=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, VOCBatch) and len(batch) == 2 and batch.index.tolist() == [0, 1]
    assert [tuple(im.shape) for im in batch.images] == [(3, 48, 60), (3, 48, 48)]  # 80x64 and 64x64 images
    assert [b.shape for b in batch.boxes] == [(1, 4), (1, 4)]


def test_undecodable_image_is_skipped_and_counted(tmp_path):
    root = write_voc(tmp_path, IMAGES[:2], {"trainval": ["000005", "000007"]})
    (root / "VOC2007" / "JPEGImages" / "000005.jpg").write_bytes(b"not a jpeg")
    data = VOCDetectionDataset(root, "trainval", image_size=32)
    with pytest.warns(UserWarning, match=r"000005\.jpg"):
        batch = VOCBatch.collate([data[0], data[1]])
    assert len(batch) == 1 and batch.skipped == 1 and batch.index.tolist() == [1]
