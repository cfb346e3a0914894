"""NYU depth v2 transfer: readers of the real on-disk layouts, berHu, metrics, decoder, CLI runs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import DataLoader

from mtssl_lightning.cli import run
from mtssl_lightning.evaluation.depth import (
    DepthBatch,
    DepthEstimator,
    DepthMetrics,
    DepthSample,
    NYUDepthDataModule,
    NYUDepthDataset,
    NYULabeledMat,
    PairedFiles,
    UpProjection,
    berhu_loss,
    folder_pairs,
    l1_loss,
    open_depth_sources,
    unpool2x,
)
from mtssl_lightning.trunks import ResNetV2

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "eval" / "nyu_depth.yaml"


# ----------------------------------------------------------------------------- writers
def frames(n: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random RGB ``(n, h, w, 3)`` uint8 and depth ``(n, h, w)`` float32 metres, asymmetric on purpose."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.5, size=(n, h, w)).astype(np.float32)
    depth[:, 0, -1] = 7.25  # a marker at the top-right corner
    return rgb, depth


def write_labeled_mat(path: Path, rgb: np.ndarray, depth: np.ndarray) -> None:
    """Write like MATLAB's ``save -v7.3``: the H×W×3×N / H×W×N arrays, column-major, i.e. HDF5
    sees every axis reversed (numpy ``.T``); with MATLAB's 512-byte user block header."""
    images_matlab = np.stack(list(rgb), axis=-1)  # (H, W, 3, N), MATLAB's shape
    depths_matlab = np.stack(list(depth), axis=-1)  # (H, W, N)
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("images", data=np.ascontiguousarray(images_matlab.T))
        f.create_dataset("depths", data=np.ascontiguousarray(depths_matlab.T))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")


def write_pair(folder: Path, name: str, rgb: np.ndarray, depth_units: np.ndarray, rgb_ext: str = ".png") -> None:
    """``<name><rgb_ext>`` and ``<name>_depth.png`` (``depth_units`` uint16 = 16-bit PNG, uint8 = 8-bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / f"{name}{rgb_ext}")
    Image.fromarray(depth_units).save(folder / f"{name}_depth.png")


@pytest.fixture()
def labeled_mat(tmp_path):
    rgb, depth = frames(5, 6, 10)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    write_labeled_mat(path, rgb, depth)
    return path, rgb, depth


# ----------------------------------------------------------------------------- readers
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


# ----------------------------------------------------------------------------- loss and metrics
def test_berhu_matches_its_formula_on_a_hand_computed_case():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 1, 1, 5)
    residual = torch.tensor([0.1, -0.5, 1.0, 2.0, 50.0]).view(1, 1, 1, 5)
    valid = torch.tensor([True, True, True, True, False]).view(1, 1, 1, 5)  # the 50 m outlier is invalid
    pred = target + residual
    # c = 0.2 * 2.0 = 0.4: |0.1| <= c -> 0.1; others (x^2 + c^2) / (2c)
    expected = (0.1 + (0.25 + 0.16) / 0.8 + (1.0 + 0.16) / 0.8 + (4.0 + 0.16) / 0.8) / 4
    assert math.isclose(berhu_loss(pred, target, valid).item(), expected, rel_tol=1e-6)
    assert math.isclose(l1_loss(pred, target, valid).item(), (0.1 + 0.5 + 1.0 + 2.0) / 4, rel_tol=1e-6)
    # c = 0.2 * 5 = 1: the residual 1 sits at c, where |x| = (x^2 + c^2) / (2c) = 1; 5 -> (25 + 1) / 2
    edge = torch.tensor([1.0, 5.0]).view(1, 1, 1, 2)
    got = berhu_loss(edge, torch.zeros_like(edge), torch.ones_like(edge, dtype=torch.bool)).item()
    assert math.isclose(got, (1.0 + 13.0) / 2, rel_tol=1e-6)
    none = berhu_loss(pred.requires_grad_(), target, torch.zeros_like(valid))
    none.backward()
    assert none.item() == 0 and (pred.grad == 0).all()


def test_metrics_perfect_imperfect_and_invalid_pixels():
    truth = torch.tensor([[1.0, 2.0], [4.0, 5.0]]).view(1, 1, 2, 2)
    all_valid = torch.ones_like(truth, dtype=torch.bool)
    perfect = DepthMetrics()
    perfect.update(truth.clone(), truth, all_valid)
    out = perfect.compute()
    assert out["delta1"] == 1 and out["abs_rel"] == 0 and out["rmse"] == 0 and out["log10"] == 0

    metrics = DepthMetrics()
    pred = truth.clone()
    pred[0, 0, 0] *= 1.3  # half the pixels 30 % too far: 1.3 and 2.6 for 1 and 2
    invalid_pred = torch.cat([pred, torch.full((1, 1, 1, 2), 100.0)], dim=2)  # a third row, invalid
    invalid_truth = torch.cat([truth, torch.full((1, 1, 1, 2), 1.0)], dim=2)
    valid = torch.cat([all_valid, torch.zeros(1, 1, 1, 2, dtype=torch.bool)], dim=2)
    metrics.update(invalid_pred, invalid_truth, valid)
    out = metrics.compute()
    assert math.isclose(out["delta1"].item(), 0.5)  # 1.3 > 1.25
    assert math.isclose(out["delta2"].item(), 1.0) and math.isclose(out["delta3"].item(), 1.0)  # 1.3 < 1.5625
    assert math.isclose(out["abs_rel"].item(), 0.15, rel_tol=1e-6)  # (0.3 + 0.3 + 0 + 0) / 4
    assert math.isclose(out["rmse"].item(), math.sqrt((0.3**2 + 0.6**2) / 4), rel_tol=1e-6)
    assert math.isclose(out["log10"].item(), 2 * math.log10(1.3) / 4, rel_tol=1e-6)


def test_metrics_pool_pixels_over_the_whole_set():
    """RMSE is one root over all pixels, not a mean of per-image RMSEs."""
    metrics = DepthMetrics()
    a = torch.full((1, 1, 1, 1), 2.0)
    metrics.update(a + 1.0, a, torch.ones_like(a, dtype=torch.bool))  # one pixel, error 1
    b = torch.full((1, 1, 1, 3), 2.0)
    metrics.update(b, b, torch.ones_like(b, dtype=torch.bool))  # three perfect pixels
    out = metrics.compute()
    assert math.isclose(out["rmse"].item(), math.sqrt(1 / 4), rel_tol=1e-6)  # per-image mean would be 0.5
    assert math.isclose(out["delta1"].item(), 3 / 4)


# ----------------------------------------------------------------------------- model
def test_unpooling_and_up_projection_shapes():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    up = unpool2x(x)
    expected = torch.zeros(1, 1, 4, 6)
    expected[..., ::2, ::2] = x
    assert torch.equal(up, expected)
    block = UpProjection(8, 4)
    assert block(torch.randn(2, 8, 3, 5)).shape == (2, 4, 6, 10)


def test_estimator_predicts_positive_depth_at_the_input_size():
    trunk = ResNetV2("tiny", width=0.125)
    model = DepthEstimator(trunk=trunk, output_stride=2).eval()
    assert len(model.decoder.blocks) == 3  # 16 -> 2
    with torch.no_grad():
        depth = model(torch.rand(2, 3, 40, 56))
    assert depth.shape == (2, 1, 40, 56) and (depth > 0).all()
    assert abs(depth.mean().item() - 2.5) < 0.5  # starts near a typical indoor depth
    with pytest.raises(ValueError, match="output_stride"):
        DepthEstimator(trunk=ResNetV2("tiny", width=0.125), output_stride=16)


# ----------------------------------------------------------------------------- CLI end to end
def _config(tmp_path: Path) -> Path:
    text = re.sub(r"runs/nyu_depth", str(tmp_path / "runs"), CONFIG.read_text())
    path = tmp_path / "nyu_depth.yaml"
    path.write_text(text)
    return path


def _overrides(tmp_path: Path, trunk_path: Path, data: Path, frozen: bool) -> list[str]:
    return [
        f"--model.checkpoint={trunk_path}", f"--model.init_args.frozen={str(frozen).lower()}",
        "--model.trunk.init_args.depth=tiny", "--model.trunk.init_args.width=0.125",
        f"--data.root={data}", "--data.image_size=[32, 48]", "--data.crop_size=[32, 32]",
        "--data.batch_size=2", "--data.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.logger=false",
        "--trainer.max_steps=3", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]


@pytest.fixture()
def cli_inputs(tmp_path):
    rgb, depth = frames(6, 32, 48, seed=4)
    data = tmp_path / "nyu_depth_v2_labeled.mat"
    write_labeled_mat(data, rgb, depth)
    torch.manual_seed(0)
    trunk = ResNetV2("tiny", width=0.125)
    trunk_path = tmp_path / "trunk.pt"
    torch.save({"trunk_spec": trunk.spec(), "state_dict": trunk.state_dict()}, trunk_path)
    return trunk, trunk_path, data


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "fine-tuned"])
def test_cli_fit_and_validate_on_the_nyu_config(tmp_path, cli_inputs, frozen):
    trunk, trunk_path, data = cli_inputs
    config = _config(tmp_path)
    cli = run(["fit", "--config", str(config), *_overrides(tmp_path, trunk_path, data, frozen)])
    model = cli.model
    assert isinstance(model, DepthEstimator) and cli.trainer.global_step == 3
    for key in ("train/loss", "val/loss", "val/delta1", "val/delta2", "val/delta3", "val/abs_rel", "val/rmse"):
        assert key in cli.trainer.callback_metrics, key
    trained = model.trunk.state_dict()
    changed = [k for k, v in trunk.state_dict().items() if not torch.equal(v, trained[k].cpu())]
    bn_buffers = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    if frozen:
        assert changed == []  # weights and BN statistics untouched
        assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
        assert not any(id(p) in optimized for p in model.trunk.parameters())
    else:
        assert any(k.endswith("weight") and "bn" not in k for k in changed)
        assert set(bn_buffers) & set(changed)  # fine-tuning moves BN statistics too
        return
    ckpt = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    val = run(["validate", "--config", str(config), *_overrides(tmp_path, trunk_path, data, frozen), f"--ckpt_path={ckpt}"])
    metrics = val.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/delta1"]) <= 1.0 and float(metrics["val/rmse"]) > 0


# ----------------------------------------------------------------------------- learning
def synthetic_scenes(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rooms whose depth is readable from the picture: a floor plane getting farther upwards plus
    a box, with the colour (red = near, blue = far) following the depth; ``(n, 3, h, w)``, ``(n, 1, h, w)``."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, h).view(1, h, 1)
    near = 1.0 + 4.0 * torch.rand(n, 1, 1, generator=g)
    depth = (near + 4.0 * (1 - rows)).expand(n, h, w).clone()  # farther towards the top
    for i in range(n):
        y, x = int(torch.randint(0, h // 2, (), generator=g)), int(torch.randint(0, w // 2, (), generator=g))
        depth[i, y : y + h // 3, x : x + w // 3] = 1.0 + 0.5 * torch.rand((), generator=g)
    t = ((depth - 1.0) / 8.0).clamp(0, 1)
    images = torch.stack([1 - t, 0.3 + 0.2 * torch.rand(n, h, w, generator=g), t], dim=1)
    return images, depth[:, None]


@pytest.mark.slow
def test_depth_model_learns_synthetic_scenes_better_than_a_constant():
    torch.manual_seed(0)
    images, depth = synthetic_scenes(24, 32, 32, seed=0)
    test_images, test_depth = synthetic_scenes(8, 32, 32, seed=1)
    samples = [DepthSample(images[i], depth[i], depth[i] > 0, i) for i in range(24)]
    loader = DataLoader(samples, batch_size=8, shuffle=True, collate_fn=DepthBatch.collate)
    model = DepthEstimator(
        trunk=ResNetV2("tiny", width=0.125), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), output_stride=4
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=loader)

    model.eval()
    valid = torch.ones_like(test_depth, dtype=torch.bool)
    learned, constant = DepthMetrics(), DepthMetrics()
    with torch.no_grad():
        learned.update(model(test_images), test_depth, valid)
    constant.update(torch.full_like(test_depth, float(depth.median())), test_depth, valid)
    ours, baseline = learned.compute(), constant.compute()
    assert ours["delta1"] > baseline["delta1"] + 0.2, (ours, baseline)
    assert ours["rmse"] < 0.7 * baseline["rmse"], (ours, baseline)


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
