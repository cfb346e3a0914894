"""The depth model: berHu by hand, the decoder's shapes, CLI runs of the NYU config, learning synthetic scenes."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from evaluation.helpers import eval_config, export_tiny_trunk, frames, write_labeled_mat
from mtssl_lightning.cli import run
from mtssl_lightning.evaluation.depth.data import DepthBatch, DepthSample
from mtssl_lightning.evaluation.depth.metrics import DepthMetrics
from mtssl_lightning.evaluation.depth.model import DepthEstimator, UpProjection, berhu_loss, l1_loss, unpool2x
from mtssl_lightning.trunks import ResNetV2


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


def test_unpooling_and_up_projection_shapes():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    up = unpool2x(x)
    expected = torch.zeros(1, 1, 4, 6)
    expected[..., ::2, ::2] = x
    assert torch.equal(up, expected)
    block = UpProjection(8, 4)
    assert block(torch.randn(2, 8, 3, 5)).shape == (2, 4, 6, 10)


def test_estimator_predicts_positive_depth_at_the_input_size():
    torch.manual_seed(0)  # the random init decides how far from 2.5 m it starts; not the tests run before it
    trunk = ResNetV2("tiny", width=0.125)
    model = DepthEstimator(trunk=trunk, output_stride=2).eval()
    assert len(model.decoder.blocks) == 3  # 16 -> 2
    with torch.no_grad():
        depth = model(torch.rand(2, 3, 40, 56))
    assert depth.shape == (2, 1, 40, 56) and (depth > 0).all()
    assert abs(depth.mean().item() - 2.5) < 0.5  # starts near a typical indoor depth
    with pytest.raises(ValueError, match="output_stride"):
        DepthEstimator(trunk=ResNetV2("tiny", width=0.125), output_stride=16)


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
    trunk_path = export_tiny_trunk(tmp_path / "trunk.pt")
    return torch.load(trunk_path, weights_only=True)["state_dict"], trunk_path, data


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "fine-tuned"])
def test_cli_fit_and_validate_on_the_nyu_config(tmp_path, cli_inputs, frozen):
    saved, trunk_path, data = cli_inputs
    config = eval_config(tmp_path, "nyu_depth.yaml")
    cli = run(["fit", "--config", str(config), *_overrides(tmp_path, trunk_path, data, frozen)])
    model = cli.model
    assert isinstance(model, DepthEstimator) and cli.trainer.global_step == 3
    for key in ("train/loss", "val/loss", "val/delta1", "val/delta2", "val/delta3", "val/abs_rel", "val/rmse"):
        assert key in cli.trainer.callback_metrics, key
    trained = model.trunk.state_dict()
    changed = [k for k, v in saved.items() if not torch.equal(v, trained[k].cpu())]
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
