"""Readers of the real NYU on-disk layouts: the labelled .mat, the official split, PNG folders, CSV lists."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from evaluation.helpers import frames, write_labeled_mat, write_pair
from mtssl_lightning.evaluation.depth.data import DepthBatch, NYUDepthDataModule, NYUDepthDataset
from mtssl_lightning.evaluation.depth.sources import NYULabeledMat, open_depth_sources


@pytest.fixture()
def labeled_mat(tmp_path):
    rgb, depth = frames(5, 6, 10)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    write_labeled_mat(path, rgb, depth)
    return path, rgb, depth


def test_labeled_mat_round_trip_and_orientation(labeled_mat):
    path, rgb, depth = labeled_mat
    with h5py.File(path, "r") as f:  # really MATLAB's transposed layout on disk
        assert f["images"].shape == (5, 3, 10, 6) and f["depths"].shape == (5, 10, 6)
    source = NYULabeledMat(path)
    assert len(source) == 5 and source.frame_size() == (6, 10)
    for i in range(5):
        got_rgb, got_depth = source.load(i)
        assert got_rgb.shape == (6, 10, 3) and got_depth.shape == (6, 10)
        np.testing.assert_array_equal(got_rgb, rgb[i])
        np.testing.assert_array_equal(got_depth, depth[i])
        assert got_depth[0, -1] == 7.25  # top-right stays top-right


def test_official_split_file_is_one_based_and_found_beside_the_file(labeled_mat):
    path, rgb, depth = labeled_mat
    # the official splits.mat is a MATLAB v5 file of 1-based column vectors
    savemat(path.parent / "splits.mat", {"trainNdxs": np.array([[1.0], [3.0], [5.0]]), "testNdxs": np.array([[2.0], [4.0]])})
    dm = NYUDepthDataModule(root=str(path), image_size=(6, 10), crop_size=None, flip=False, batch_size=8, num_workers=0)
    dm.setup("fit")
    assert dm.train_set.source.indices == [0, 2, 4] and dm.test_set.source.indices == [1, 3]
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, DepthBatch)
    assert batch.images.shape == (2, 3, 6, 10) and batch.images.dtype == torch.float32
    assert batch.depth.shape == batch.valid.shape == (2, 1, 6, 10) and batch.valid.dtype == torch.bool
    expected_images = torch.from_numpy(rgb[[1, 3]]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(batch.images, expected_images, rtol=0, atol=0)
    torch.testing.assert_close(batch.depth[:, 0], torch.from_numpy(depth[[1, 3]]), rtol=0, atol=0)
    assert batch.valid.all() and batch.index.tolist() == [0, 1]


def test_without_split_file_the_split_is_contiguous_and_deterministic(labeled_mat):
    path, _, _ = labeled_mat
    train, test = open_depth_sources(path, test_fraction=0.4)
    assert train.indices == [0, 1, 2] and test.indices == [3, 4]


def test_png_folder_round_trip_with_16bit_millimetres(tmp_path):
    rgb, depth = frames(3, 6, 10, seed=1)
    mm = np.round(depth * 1000).astype(np.uint16)
    mm[0, 2:4, 1:3] = 0  # invalid pixels
    root = tmp_path / "nyu"
    write_pair(root / "train" / "kitchen_0001", "00000", rgb[0], mm[0])
    write_pair(root / "train" / "office_0002" / "deeper", "00001", rgb[1], mm[1])
    write_pair(root / "test", "00002", rgb[2], mm[2], rgb_ext=".jpg")
    train, test = open_depth_sources(root)
    assert len(train) == 2 and len(test) == 1
    assert [Path(n).name for n in train.names] == ["00000.png", "00001.png"]
    for i in range(2):
        got_rgb, got_depth = train.load(i)
        np.testing.assert_array_equal(got_rgb, rgb[i])
        np.testing.assert_allclose(got_depth, mm[i].astype(np.float64) / 1000, rtol=0, atol=1e-6)
    assert test.load(0)[1].shape == (6, 10)  # the .jpg image is paired too (lossy, so not compared)

    dataset = NYUDepthDataset(train, image_size=(6, 10))
    sample = dataset[0]
    assert sample.depth.shape == sample.valid.shape == (1, 6, 10)
    np.testing.assert_array_equal(sample.valid[0].numpy(), mm[0] > 0)
    assert (sample.depth[~sample.valid] == 0).all()


def test_densedepth_csv_lists_with_8bit_training_depth(tmp_path):
    """DenseDepth's export: data/nyu2_{train,test}.csv, rows relative to the folder above data/."""
    rgb, depth = frames(2, 6, 10, seed=2)
    base = tmp_path / "nyu_data"
    eight_bit = np.clip(np.round(depth[0] / 10 * 255), 1, 255).astype(np.uint8)
    write_pair(base / "data" / "nyu2_train" / "bedroom_0001", "1", rgb[0], eight_bit)
    mm = np.round(depth[1] * 1000).astype(np.uint16)
    write_pair(base / "data" / "nyu2_test", "00000", rgb[1], mm)
    (base / "data" / "nyu2_train.csv").write_text(
        "data/nyu2_train/bedroom_0001/1.png,data/nyu2_train/bedroom_0001/1_depth.png\n"
    )
    (base / "data" / "nyu2_test.csv").write_text("data/nyu2_test/00000.png,data/nyu2_test/00000_depth.png\n")
    train, test = open_depth_sources(base / "data")
    got_rgb, got_depth = train.load(0)
    np.testing.assert_array_equal(got_rgb, rgb[0])
    np.testing.assert_allclose(got_depth, eight_bit * (10 / 255), rtol=1e-6)
    np.testing.assert_allclose(test.load(0)[1], mm / 1000, rtol=0, atol=1e-6)


def test_clear_errors_for_missing_or_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        open_depth_sources(tmp_path / "nope.mat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nyu2_train.csv"):
        open_depth_sources(tmp_path / "empty")
    v5 = tmp_path / "old.mat"
    savemat(v5, {"images": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="v7.3"):
        open_depth_sources(v5)
    other = tmp_path / "other.mat"
    with h5py.File(other, "w") as f:
        f.create_dataset("rgb", data=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"'depths'"):
        open_depth_sources(other)
    orphan = tmp_path / "orphan"
    (orphan / "train").mkdir(parents=True)
    Image.fromarray(np.ones((4, 4), np.uint16)).save(orphan / "train" / "x_depth.png")
    with pytest.raises(FileNotFoundError, match="x_depth.png"):
        open_depth_sources(orphan)
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "nyu2_train.csv").write_text("a.png,a_depth.png\n")
    with pytest.raises(FileNotFoundError, match="line 1"):
        open_depth_sources(listed)
