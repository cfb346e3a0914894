"""Faster R-CNN on the tiny trunk fits (frozen and fine-tuned) and validates from the YAML config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.helpers import EVAL_CONFIGS
from mtssl_lightning.cli import run
from mtssl_lightning.evaluation.detection.model import FasterRCNNDetector

CONFIG = EVAL_CONFIGS / "voc07_detection.yaml"


def tiny_overrides(tmp_path: Path, voc_root: Path, checkpoint: Path, frozen: bool) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",  # the config validates every 5000 steps
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.checkpoint={checkpoint}",
        "--model.trunk.init_args.depth=tiny",  # the config's baseline trunk, unused with a checkpoint: keep it cheap
        "--model.trunk.init_args.width=0.125",
        f"--model.frozen={str(frozen).lower()}",
        "--model.min_size=64",
        "--model.max_size=96",
        "--model.anchor_sizes=[16, 32, 64]",
        "--model.rpn_pre_nms_top_n_train=64",
        "--model.rpn_post_nms_top_n_train=16",
        "--model.rpn_pre_nms_top_n_test=64",
        "--model.rpn_post_nms_top_n_test=16",
        "--model.rpn_batch_size_per_image=32",
        "--model.box_batch_size_per_image=16",
        "--model.box_score_thresh=0.0",
        "--model.box_detections_per_img=20",
        "--model.warmup_steps=1",
        "--model.optimizer.init_args.lr=0.05",
        f"--data.root={voc_root}",
        "--data.image_size=64",
        "--data.max_size=96",
        "--data.batch_size=2",
        "--data.num_workers=0",
    ]


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "finetune"])
def test_fit_then_validate_from_yaml(tmp_path, voc_root, trunk_export, frozen):
    before = torch.load(trunk_export, weights_only=True)["state_dict"]
    cli = run(["fit", *tiny_overrides(tmp_path, voc_root, trunk_export, frozen)])
    model = cli.model
    assert isinstance(model, FasterRCNNDetector) and cli.trainer.global_step == 2
    assert model.model.transform.image_mean == [0.0] * 3 and model.model.transform.image_std == [1.0] * 3
    after = model.trunk.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k].cpu())]
    if frozen:
        assert changed == []  # weights and BN running statistics untouched
        assert all(not p.requires_grad for p in model.trunk.parameters())
    else:
        trunk_params = {n for n, _ in model.trunk.named_parameters()}
        assert trunk_params & set(changed), "fine-tuning did not change any trunk weight"
    for name in (
        "train/loss",
        "train/loss_classifier",
        "train/loss_box_reg",
        "train/loss_objectness",
        "train/loss_rpn_box_reg",
    ):
        assert torch.isfinite(cli.trainer.callback_metrics[name]), name
    # validation ran at the end of the (2-step) epoch
    for name in ("val/mAP50", "val/mAP50_voc07"):
        assert 0.0 <= cli.trainer.callback_metrics[name].item() <= 1.0, name

    if frozen:  # `mtssl validate` on the trained weights, restored from a Lightning checkpoint
        cli.trainer.save_checkpoint(tmp_path / "detector.ckpt")
        cli = run(
            [
                "validate",
                *tiny_overrides(tmp_path, voc_root, trunk_export, frozen),
                f"--ckpt_path={tmp_path / 'detector.ckpt'}",
            ]
        )
        metrics = cli.trainer.callback_metrics
        assert {"val/mAP50", "val/mAP50_voc07"} <= set(metrics)
        assert all(0.0 <= metrics[k].item() <= 1.0 for k in ("val/mAP50", "val/mAP50_voc07"))


def test_box_coding_stays_float32_under_bf16_autocast():
    """torchvision's BoxCoder casts the boxes to the regression's dtype; under bf16 autocast that
    moves a corner at ~600 px by up to a few pixels. Wrapped, encode and decode give the float32
    results (and torchvision still calls the attributes the wrapper replaces)."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from mtssl_lightning.evaluation.detection.model import Float32BoxCoding
    from mtssl_lightning.trunks import ResNetV2

    model = FasterRCNNDetector(trunk=ResNetV2("tiny", width=0.125), min_size=64, max_size=96)
    coder = model.model.roi_heads.box_coder
    assert isinstance(coder, Float32BoxCoding) and isinstance(model.model.rpn.box_coder, Float32BoxCoding)
    for cls in (RegionProposalNetwork, RoIHeads):  # what torchvision's heads call on their coder
        source = __import__("inspect").getsource(cls)
        assert "self.box_coder.decode(" in source and "self.box_coder.encode(" in source, cls
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[512.3, 401.7, 590.2, 599.1], [3.2, 7.9, 120.4, 88.8]])]
    deltas = torch.randn(2, 4, generator=g) * 0.1
    rounded = deltas.to(torch.bfloat16)  # what a bf16 regression head outputs
    exact = coder.coder.decode(rounded.float(), boxes)  # torchvision's own, in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = coder.decode(rounded, boxes)
        theirs = coder.coder.decode(rounded, boxes)
    torch.testing.assert_close(ours, exact, atol=1e-4, rtol=0)
    assert (theirs.float() - exact).abs().max() > 0.5  # torchvision alone: the boxes themselves rounded to bf16
    encoded = coder.encode([boxes[0]], [boxes[0] + 1.0])
    assert encoded[0].dtype == torch.float32
