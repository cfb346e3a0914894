"""The DataModule: one named sub-batch per task from the workers, turned into complete task batches on the
device by the tasks' samplers — also when the DataModule is used without any LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from toy_tasks import Brightness, BrightnessSampler

from mtssl_lightning import MultiTaskSSL
from mtssl_lightning.data import ClipBatch, ImageBatch, MultiTaskDataModule, TaskBatch
from mtssl_lightning.data.video import VideoFolder
from mtssl_lightning.tasks import (
    ColorizationSampler,
    ExemplarSampler,
    MotionSegmentationSampler,
    RelativePositionSampler,
)
from mtssl_lightning.tasks.colorization import ColorizationBatch
from mtssl_lightning.tasks.exemplar import ExemplarBatch
from mtssl_lightning.tasks.motion_segmentation import MotionSegmentationBatch
from mtssl_lightning.tasks.relative_position import RelativePositionBatch
from mtssl_lightning.trunks import ResNetV2


def _four_samplers() -> dict:
    """The quickstart's four tasks at small batch sizes (no model anywhere)."""
    return {
        "rp": RelativePositionSampler(batch_size=3, patch_size=16, gap=4, jitter=2, pairs="all", colour="drop"),
        "col": ColorizationSampler(batch_size=3, image_size=48),
        "ex": ExemplarSampler(batch_size=2, image_size=48, views=3, view_size=32),
        "ms": MotionSegmentationSampler(batch_size=2, image_size=48, clip_length=5, frame_stride=2),
    }


def test_a_datamodule_alone_yields_complete_task_batches_for_the_four_tasks():
    """No LightningModule, no Trainer: loaders + ``on_after_batch_transfer`` give every task its
    trunk inputs and targets, with the shapes and dtypes the tasks' losses read."""
    dm = MultiTaskDataModule(steps_per_epoch=1, val_samples=4, num_workers=0, samplers=_four_samplers())
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    assert isinstance(raw["rp"], ImageBatch) and isinstance(raw["ms"], ClipBatch)
    batches = dm.on_after_batch_transfer(raw, 0)
    assert set(batches) == {"rp", "col", "ex", "ms"} and all(isinstance(b, TaskBatch) for b in batches.values())

    rp = batches["rp"]  # 3 images × 8 pairs, each of the 9 patches cut once per image
    assert isinstance(rp, RelativePositionBatch) and rp.inputs.shape == (27, 3, 16, 16) and rp.inputs.dtype == torch.float32
    assert rp.labels.shape == rp.first.shape == rp.second.shape == (24,) and rp.labels.dtype == torch.int64
    assert int(rp.labels.min()) >= 0 and int(rp.labels.max()) <= 7
    col = batches["col"]  # Lab L input, ab targets at 1/4 resolution: 5 bins and weights per pixel
    assert isinstance(col, ColorizationBatch) and col.inputs.shape == (3, 3, 48, 48)
    assert col.target_bins.shape == col.target_weights.shape == (3, 5, 12, 12) and col.target_bins.dtype == torch.int64
    torch.testing.assert_close(col.target_weights.sum(1), torch.ones(3, 12, 12))
    assert torch.equal(col.inputs[:, 0], col.inputs[:, 2])  # grey: L replicated
    ex = batches["ex"]  # 3 views of each of 2 images
    assert isinstance(ex, ExemplarBatch) and ex.inputs.shape == (6, 3, 32, 32)
    assert torch.equal(ex.labels, torch.tensor([0, 0, 0, 1, 1, 1]))
    ms = batches["ms"]  # key frames and their motion masks
    assert isinstance(ms, MotionSegmentationBatch) and ms.inputs.shape == (2, 3, 48, 48)
    assert ms.masks.shape == (2, 1, 48, 48) and ms.targets.shape == (2, 1, 12, 12) and ms.targets.dtype == torch.float32
    assert set(ms.targets.unique().tolist()) <= {0.0, 1.0}
    for name, batch in batches.items():  # what the step's throughput and bad-file counters read
        assert batch.samples == len(raw[name]) and batch.skipped == 0
        assert 0.0 <= float(batch.inputs.min()) and float(batch.inputs.max()) <= 1.0


def test_validation_task_inputs_are_the_same_every_epoch_and_training_ones_are_not():
    dm = MultiTaskDataModule(steps_per_epoch=2, val_samples=6, num_workers=0, samplers=_four_samplers())
    dm.setup("fit")

    def epoch(loader, training):
        return [dm.build(raw, training=training) for raw, *_ in loader]

    first, second = epoch(dm.val_dataloader(), False), epoch(dm.val_dataloader(), False)
    assert len(first) == 3  # 6 samples: rp/col batches of 3 (2 batches), ex/ms batches of 2 (3 batches)
    for a, b in zip(first, second):
        for name in a:
            if a[name] is not None:
                assert torch.equal(a[name].inputs, b[name].inputs), name
    # ... while the same raw batch built twice for training draws new patch offsets and views
    raw, *_ = next(iter(dm.train_dataloader()))
    one, two = dm.build(raw, training=True), dm.build(raw, training=True)
    assert not torch.equal(one["rp"].inputs, two["rp"].inputs) and not torch.equal(one["ex"].inputs, two["ex"].inputs)


def test_a_subclass_adds_its_own_gpu_augmentation_and_keeps_the_task_batches():
    """The card's extension point: override the DataModule's ``on_after_batch_transfer`` and call super."""

    class Inverted(MultiTaskDataModule):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            batches = super().on_after_batch_transfer(batch, dataloader_idx)
            for sub in batches.values():
                sub.inputs = 1.0 - sub.inputs
            return batches

    model = MultiTaskSSL({"b": Brightness(batch_size=2, image_size=32)}, trunk=ResNetV2("tiny", width=0.125))
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch)

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[Spy()],
    )
    trainer.fit(model, Inverted(steps_per_epoch=1, num_workers=0))  # samplers come from the model
    (batch,) = seen
    assert isinstance(batch["b"], TaskBatch) and batch["b"].samples == 2
    # brightness targets are means of the task's own inputs: after the inversion they no longer are
    assert not torch.allclose(batch["b"].target, batch["b"].inputs.mean(dim=(1, 2, 3)))


def test_without_samplers_or_a_model_the_datamodule_says_what_it_needs():
    with pytest.raises(RuntimeError, match="samplers=model.task_samplers"):
        MultiTaskDataModule(num_workers=0).setup("fit")


def test_datamodule_gives_one_named_sub_batch_per_task():
    samplers = {"a": BrightnessSampler(batch_size=4, image_size=32), "b": BrightnessSampler(batch_size=2, image_size=48)}
    dm = MultiTaskDataModule(steps_per_epoch=3, val_samples=4, num_workers=0, samplers=samplers)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 3
    batch = train[0][0]
    assert set(batch) == {"a", "b"}
    assert isinstance(batch["a"], ImageBatch) and batch["a"].images.shape == (4, 3, 32, 32)
    assert batch["b"].images.shape == (2, 3, 48, 48) and batch["b"].images.dtype == torch.uint8
    val = [b for b, *_ in dm.val_dataloader()]
    # 4 validation crops: task a has one batch of 4, task b two of 2 (then None for a)
    assert len(val) == 2 and val[1]["a"] is None and val[1]["b"].images.shape[0] == 2


def test_a_task_crop_area_overrides_the_datamodules(tmp_path):
    """A horizontal ramp (value = 4 × column): a crop covering the whole image spans 0…252; with
    the task's ``crop_area=(1, 1)`` every training crop does; a task with ``crop_area=(0.05,
    0.1)`` never gets a crop wider than sqrt(0.1 × 4/3) of the image (~0.37: ≤ 94 grey levels);
    the task that keeps the DataModule's ``min_scale=0.05`` gets both narrow and wide crops."""
    ramp = (torch.arange(64) * 4).to(torch.uint8).expand(64, 3, 64).permute(1, 0, 2).contiguous()  # (3, H, W)
    Image.fromarray(ramp.permute(1, 2, 0).numpy()).save(tmp_path / "ramp.png")
    Image.fromarray(ramp.permute(1, 2, 0).numpy()).save(tmp_path / "ramp2.png")
    samplers = {
        "whole": BrightnessSampler(batch_size=6, image_size=32, crop_area=(1.0, 1.0)),
        "small": BrightnessSampler(batch_size=6, image_size=32, crop_area=(0.05, 0.1)),
        "any": BrightnessSampler(batch_size=6, image_size=32),
    }
    dm = MultiTaskDataModule(image_root=str(tmp_path), steps_per_epoch=3, num_workers=0, min_scale=0.05, samplers=samplers)
    dm.setup("fit")
    spans = {"whole": [], "small": [], "any": []}
    for batch, *_ in dm.train_dataloader():
        for name, images in ((n, batch[n].images.float()) for n in spans):
            spans[name] += (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))).tolist()
    assert min(spans["whole"]) >= 240, spans["whole"]
    assert max(spans["small"]) <= 100, spans["small"]
    assert min(spans["any"]) < 160 and max(spans["any"]) > 160, spans["any"]
    with pytest.raises(ValueError, match="crop_area"):
        BrightnessSampler(crop_area=(0.5, 1.5))


def test_datamodule_video_task_needs_a_video_root_beside_an_image_root(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    dm = MultiTaskDataModule(image_root=str(tmp_path), num_workers=0, samplers={"ms": MotionSegmentationSampler()})
    with pytest.raises(ValueError, match="video_root"):
        dm.setup("fit")
    dm = MultiTaskDataModule(video_root=str(tmp_path / "nope"), num_workers=0, samplers={"ms": MotionSegmentationSampler()})
    with pytest.raises(FileNotFoundError, match="nope"):
        dm.setup("fit")


def test_datamodule_gives_clips_of_the_sample_video_split_in_time():
    samplers = {
        "img": BrightnessSampler(batch_size=2, image_size=32),
        "ms": MotionSegmentationSampler(batch_size=3, image_size=40, clip_length=5, frame_stride=2),
    }
    dm = MultiTaskDataModule(steps_per_epoch=2, num_workers=0, samplers=samplers)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 2
    clips = train[0][0]["ms"]
    assert isinstance(clips, ClipBatch) and clips.clips.shape == (3, 5, 3, 40, 40) and clips.clips.dtype == torch.uint8
    assert clips.masks is None and isinstance(train[0][0]["img"], ImageBatch)
    # each sample clip's training window is its first 80 % (bikes: 200 of 250 frames, bigbuckbunny:
    # 106 of 132, carphone: 96 of 120); a clip of 5 frames at stride 2 spans 9 of them
    last_start = torch.tensor([200, 106, 96]) - 9
    assert bool((clips.start <= last_start[clips.index]).all()), (clips.start, clips.index)
    val = [b["ms"] for b, *_ in dm.val_dataloader() if b["ms"] is not None]
    assert sum(len(v) for v in val) == 8 * 3  # 8 fixed clips per validation video by default
    again = [b["ms"] for b, *_ in dm.val_dataloader() if b["ms"] is not None]
    assert all(torch.equal(a.clips, b.clips) for a, b in zip(val, again))  # the same every epoch


def test_a_frame_cache_changes_no_training_clip(monkeypatch):
    """``video_frame_cache_mb`` only saves decoding: the same seed gives the same training clips with and
    without it; the training videos fill their cache, the validation videos have none."""
    samplers = {"ms": MotionSegmentationSampler(batch_size=4, image_size=40, clip_length=5, frame_stride=2)}
    clips, decodes = {}, {}
    decode, counted = VideoFolder._seek_and_decode, []
    monkeypatch.setattr(VideoFolder, "_seek_and_decode", lambda self, *a: counted.append(a) or decode(self, *a))
    for mb in (0, 64):
        dm = MultiTaskDataModule(steps_per_epoch=12, num_workers=0, samplers=samplers, video_frame_cache_mb=mb)
        dm.setup("fit")
        counted.clear()
        torch.manual_seed(0)
        clips[mb] = [batch["ms"].clips for batch, *_ in dm.train_dataloader()]
        decodes[mb] = len(counted)
        assert dm.val_videos.frame_cache is None
    assert dm.train_videos.frame_cache is not None and len(dm.train_videos.frame_cache) > 0
    assert all(torch.equal(a, b) for a, b in zip(clips[0], clips[64], strict=True))
    assert decodes[0] == 48 and decodes[64] < 48, decodes  # some clips came from the cache
    with pytest.raises(ValueError, match="video_frame_cache_mb"):
        MultiTaskDataModule(video_frame_cache_mb=-1)
