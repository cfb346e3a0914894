"""The classification DataModule: class-folder trees with the right labels, the digits split, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.helpers import digits_datamodule, write_tree
from mtssl_lightning.evaluation.classification.data import ClassificationDataModule, LabelledBatch
from mtssl_lightning.evaluation.classification.datasets import digits_split


def test_image_folder_tree_loads_with_the_right_labels_and_skips_unreadable_files(tmp_path):
    write_tree(tmp_path / "train", {"cat": 3, "dog": 4})
    write_tree(tmp_path / "val", {"dog": 2})  # a class may have no validation images
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    dm = ClassificationDataModule(
        "folder",
        train_root=str(tmp_path / "train"),
        val_root=str(tmp_path / "val"),
        image_size=32,
        batch_size=16,
        num_workers=0,
    )
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        batch = next(iter(dm.train_eval_dataloader()))
    assert isinstance(batch, LabelledBatch)
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    # the label agrees with the colour the test painted into that class's images
    red, blue = batch.images[:, 0].mean(dim=(1, 2)), batch.images[:, 2].mean(dim=(1, 2))
    assert torch.equal(batch.labels, (blue > red).long())
    assert batch.labels.tolist().count(0) == 4  # 3 cats + the broken file replaced by its successor
    val = next(iter(dm.val_dataloader()))
    assert val.labels.tolist() == [1, 1]  # "dog" keeps the training index, not 0
    with pytest.warns(UserWarning, match="broken.jpg"):  # the augmented copy of the set meets it too
        train = next(iter(dm.train_dataloader()))  # random resized crop + flip
    assert train.images.shape == (8, 3, 32, 32)


def test_validation_classes_must_be_known_to_training(tmp_path):
    write_tree(tmp_path / "train", {"cat": 1})
    write_tree(tmp_path / "val", {"cat": 1, "dog": 1})
    dm = ClassificationDataModule(
        "folder", train_root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), num_workers=0
    )
    with pytest.raises(ValueError, match=r"data.val_root.*\['dog'\]"):
        dm.setup()


def test_digits_load_with_a_fixed_stratified_split():
    dm = digits_datamodule(val_batch_size=1000)
    assert dm.num_classes == 10 and dm.augment == "none"  # no flips of digits by default
    dm.setup()
    assert len(dm.train_set) == 1198 and len(dm.val_set) == 599  # 1797 images, 1/3 held out
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target, minlength=10)
    _, _tr_y, va_x, va_y = digits_split()
    assert np.all(np.abs(np.bincount(va_y, minlength=10) - counts / 3) <= 1)  # stratified
    assert np.array_equal(digits_split()[3], va_y)  # the same split every time
    batch = next(iter(dm.val_dataloader()))
    assert batch.images.shape == (599, 3, 32, 32)
    assert torch.equal(batch.images[:, 0], batch.images[:, 1]) and torch.equal(batch.images[:, 0], batch.images[:, 2])
    assert torch.equal(batch.labels, torch.from_numpy(va_y))
    # the 32x32 image is the 8x8 digit upsampled: 4x4 average pooling gives the digit back (up to blur)
    down = F.avg_pool2d(batch.images[:, :1], 4)[:, 0]
    orig = torch.from_numpy(va_x).float() / 255
    assert (down - orig).abs().mean() < 0.1 < (down - orig.roll(1, 0)).abs().mean()
