"""NYU frames as tensors: crops and flips keep image and depth aligned, corrupt files, evaluation resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.helpers import frames, write_labeled_mat, write_pair
from mtssl_lightning.evaluation.depth.data import NYUDepthDataModule, NYUDepthDataset
from mtssl_lightning.evaluation.depth.model import DepthEstimator
from mtssl_lightning.evaluation.depth.sources import PairedFiles, folder_pairs
from mtssl_lightning.trunks import ResNetV2


def test_training_crops_and_flips_keep_image_and_depth_aligned(tmp_path):
    """Left half dark at 1 m, right half bright at 3 m; after resize, crop and flip the depth
    must still follow the brightness (the border column may blend)."""
    h, w = 16, 24
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, w // 2 :] = 255
    mm = np.full((h, w), 1000, np.uint16)
    mm[:, w // 2 :] = 3000
    write_pair(tmp_path / "train", "a", rgb, mm)
    source = PairedFiles(folder_pairs(tmp_path / "train"), "test")
    dataset = NYUDepthDataset(source, image_size=(8, 12), crop_size=(6, 8), train=True, flip=True)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(12):
        s = dataset[0]
        assert s.image.shape == (3, 6, 8) and s.depth.shape == (1, 6, 8)
        grey = s.image.mean(0)
        assert (s.depth[0][grey < 0.2] == 1.0).all() and (s.depth[0][grey > 0.8] == 3.0).all()
        flipped += int(grey[:, 0].mean() > 0.5)  # bright on the left: flipped
    assert 0 < flipped < 12


def test_a_corrupt_file_becomes_an_all_invalid_frame_with_a_warning(tmp_path):
    rgb, _ = frames(2, 6, 10, seed=3)
    write_pair(tmp_path / "train", "a", rgb[0], np.full((6, 10), 1500, np.uint16))
    write_pair(tmp_path / "train", "b", rgb[1], np.full((6, 10), 1500, np.uint16))
    (tmp_path / "train" / "b_depth.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = NYUDepthDataset(PairedFiles(folder_pairs(tmp_path / "train"), "test"), image_size=(6, 10))
    with pytest.warns(UserWarning, match="b.png"):
        bad = dataset[1]
    assert not bad.valid.any() and bad.depth.shape == (1, 6, 10) and dataset.bad == {1}
    assert dataset[0].valid.all()


def test_evaluation_keeps_the_original_depth_resolution_and_optional_eigen_crop(tmp_path):
    rgb, depth = frames(4, 48, 64, seed=5)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    write_labeled_mat(path, rgb, depth)
    dm = NYUDepthDataModule(root=str(path), image_size=(24, 32), crop_size=(16, 16), eigen_crop=True, batch_size=2, num_workers=0)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train.images.shape == (2, 3, 16, 16) and train.depth.shape == (2, 1, 16, 16)
    batch = next(iter(dm.val_dataloader()))
    assert batch.images.shape[-2:] == (24, 32) and batch.depth.shape[-2:] == (48, 64)  # depth at the frame's size
    # Eigen's crop rows 45:471, cols 41:601 of 480x640, scaled by 1/10 (rounded): rows 4:47, cols 4:60
    expected = torch.zeros(48, 64, dtype=torch.bool)
    expected[4:47, 4:60] = True
    assert torch.equal(batch.valid[0, 0], expected)
    model = DepthEstimator(trunk=ResNetV2("tiny", width=0.125)).eval()
    with torch.no_grad():
        assert model.predict_depth(batch).shape == batch.depth.shape
