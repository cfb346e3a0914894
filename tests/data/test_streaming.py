"""An optimized copy (LitData) round trip: `mtssl optimize-data` screens and converts a folder, training
streams from the copy with the same skipped-file counts as from the folder, and a resumed run
continues mid-epoch where it stopped. Local folders stand in for object storage (offline)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from test_sources import _messy_folder
from toy_tasks import Brightness

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.cli import main, run
from mtssl_lightning.data.optimize import optimize_folder
from mtssl_lightning.data.sample import sample_images, sample_video_path
from mtssl_lightning.data.streaming import MANIFEST, StreamingSteps, is_optimized
from mtssl_lightning.trunks import ResNetV2

ROOT = Path(__file__).resolve().parents[2]


def _photos(root: Path, copies: int = 1) -> Path:
    """The sample photos as JPEG files (``copies`` of each, at qualities 90, 80 …)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, array in sample_images("all").items():
        for k in range(copies):
            Image.fromarray(array).save(root / f"{name}_{k}.jpg", quality=90 - 10 * k)
    return root


def test_optimize_data_screens_converts_and_records_what_it_left_out(tmp_path, capsys):
    broken = _messy_folder(tmp_path / "messy")
    with pytest.warns(UserWarning, match="skipping image") as record:
        code = main_code(["optimize-data", str(tmp_path / "messy"), str(tmp_path / "opt"), "--workers", "1", "--val-fraction", "0.2"])
    assert code == 0 and "Train from it with --data.image_root" in capsys.readouterr().out
    warned = {name for name in broken if any(name in str(w.message) for w in record)}
    assert warned == {"empty.jpg", "notes.jpg"}  # the header check, as when training from the folder
    manifest = json.loads((tmp_path / "opt" / MANIFEST).read_text())
    assert set(manifest["unusable"]) == {"empty.jpg", "notes.jpg"} and manifest["listed"] == 14
    assert manifest["splits"]["train"] + manifest["splits"]["val"] == 12 and manifest["splits"]["val"] >= 1
    assert is_optimized(str(tmp_path / "opt")) and is_optimized(str(tmp_path / "opt" / "train"))
    assert not is_optimized(str(tmp_path / "messy"))


def main_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return int(exit_.value.code)


def _toy_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=str(tmp_path), **kwargs,
    )


def _skipped(images: str, tmp_path: Path, steps: int) -> float:
    model = MultiTaskSSL(
        {"a": Brightness(batch_size=4, image_size=32), "b": Brightness(batch_size=3, image_size=24)}, ResNetV2("tiny", width=0.125)
    )
    dm = MultiTaskDataModule(image_root=images, val_root=None, num_workers=2, steps_per_epoch=steps, val_fraction=0.4)
    trainer = _toy_trainer(tmp_path, max_steps=steps, enable_checkpointing=False)
    with warnings.catch_warnings():  # the workers warn in their own processes; the counts are what is compared
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    return trainer.callback_metrics["train/skipped_files"].item()


def test_training_from_the_copy_skips_as_many_files_as_from_the_folder(tmp_path):
    _messy_folder(tmp_path / "messy")
    (tmp_path / "messy" / "huge.jpg").unlink()  # keeps the test quick
    optimize_folder(tmp_path / "messy", str(tmp_path / "opt"), workers=1, val_fraction=0.4, progress=False)
    # the files that pass the header check but fail to decode, in the training split (as the copy holds it)
    train_names = set(_names(tmp_path / "opt" / "train"))
    failing = train_names & {"corrupt.jpg", "truncated.png"}
    assert failing
    # 12 steps = several passes: every loader meets every file; each counts once per loader (1 worker each)
    from_folder = _skipped(str(tmp_path / "messy"), tmp_path / "a", steps=12)
    from_copy = _skipped(str(tmp_path / "opt"), tmp_path / "b", steps=12)
    assert from_folder == from_copy == 2 * len(failing)  # 2 tasks


def _names(split: Path) -> list[str]:
    """The image names an optimized split holds (read back with LitData)."""
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(split))
    return [dataset[i]["name"] for i in range(len(dataset))]


class Indices(pl.Callback):
    """The images of every training batch, by step."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = batch["a"].inputs.new_tensor([]).tolist() + self.indices
        self.indices = []

    def on_after_batch_transfer_indices(self, indices: list[int]) -> None:
        self.indices = indices


class Recording(MultiTaskDataModule):
    """A DataModule that tells ``spy`` which images each training batch holds."""

    spy: Indices | None = None

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.spy is not None and self.trainer is not None and self.trainer.training and batch.get("a") is not None:
            self.spy.on_after_batch_transfer_indices(batch["a"].index.tolist())
        return super().on_after_batch_transfer(batch, dataloader_idx)


def _fit_streaming(tmp_path: Path, images: str, max_steps: int, ckpt: str | None = None, save_every: int | None = None) -> dict[int, list[int]]:
    pl.seed_everything(7, workers=True)
    spy = Indices()
    model = MultiTaskSSL({"a": Brightness(batch_size=2, image_size=24)}, ResNetV2("tiny", width=0.125))
    dm = Recording(image_root=images, num_workers=2, steps_per_epoch=8)
    dm.spy = spy
    callbacks: list[pl.Callback] = [spy]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1, filename="{step}"))
    trainer = _toy_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(save_every))
    trainer.fit(model, dm, ckpt_path=ckpt)
    return spy.seen


def test_a_resumed_run_continues_the_stream_where_it_stopped(tmp_path):
    _photos(tmp_path / "photos")
    optimize_folder(tmp_path / "photos", str(tmp_path / "opt"), workers=1, val_fraction=0.15, progress=False)
    whole = _fit_streaming(tmp_path / "whole", str(tmp_path / "opt"), max_steps=6, save_every=3)
    assert len(whole) == 6 and all(len(v) == 2 for v in whole.values())
    checkpoint = tmp_path / "whole" / "ckpt" / "step=3.ckpt"
    resumed = _fit_streaming(tmp_path / "resumed", str(tmp_path / "opt"), max_steps=6, ckpt=str(checkpoint))
    assert sorted(resumed) == [3, 4, 5]  # mid-epoch: steps 4-6 of the 8-batch epoch
    assert [resumed[s] for s in (3, 4, 5)] == [whole[s] for s in (3, 4, 5)]


def test_stream_steps_serves_a_fixed_number_of_full_batches_and_resumes_where_it_stopped():
    class Loader:
        """A stand-in stream of 5 batches per pass, the last one incomplete: [0, 1], [2, 3], … [8]."""

        dataset = None

        def __init__(self) -> None:
            self.position = 0

        def __iter__(self):
            while self.position < 9:
                start, self.position = self.position, min(self.position + 2, 9)
                yield list(range(start, self.position))
            self.position = 0  # the next pass

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

    steps = StreamingSteps(Loader(), steps=6, min_batch=2)
    assert len(steps) == 6
    iterator = iter(steps)
    assert [next(iterator) for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]
    state = steps.state_dict()  # a checkpoint after 3 trained steps (Lightning fetches none ahead)
    assert state == {"loader": {"position": 6}, "served": 3}
    assert list(iterator) == [[6, 7], [0, 1], [2, 3]]  # [8] dropped; the next pass goes on
    resumed = StreamingSteps(Loader(), steps=6, min_batch=2)
    resumed.load_state_dict(state)
    assert list(resumed) == [[6, 7], [0, 1], [2, 3]]  # the rest of the epoch


def test_a_loader_counts_each_undecodable_image_once_across_passes():
    class Batch(list):
        skipped = 0

        @property
        def bad(self):
            return tuple(i for i in self if i in (3, 8))

    class Loader:
        dataset = None

        def __iter__(self):
            for start in range(0, 10, 2):
                yield Batch(range(start, min(start + 2, 9)))

    steps = StreamingSteps(Loader(), steps=8, min_batch=2)
    assert [b.skipped for b in steps] == [0, 1, 0, 0, 1, 0, 0, 0]  # 8 is in a dropped batch: carried over
    assert steps.known_bad == {3, 8}


@pytest.mark.slow
def test_the_four_task_tiny_config_trains_from_an_optimized_copy_with_two_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _messy_folder(tmp_path / "messy")
    (tmp_path / "messy" / "huge.jpg").unlink()
    _photos(tmp_path / "messy", copies=4)  # real photos beside the awkward files: a full batch of 32 per pass
    # a validation split of several images (a stream does not wrap around a tiny split)
    optimize_folder(tmp_path / "messy", str(tmp_path / "opt"), workers=2, val_fraction=0.4, progress=False)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "bikes.mp4").symlink_to(sample_video_path())
    copies = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", copies)
    for copy in copies.rglob("*.yaml"):
        copy.write_text(re.sub(r"runs/[A-Za-z0-9_]+", str(tmp_path), copy.read_text()))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        cli = run([
            "fit", "--config", str(copies / "pretrain" / "all.yaml"), "--config", str(copies / "tiny.yaml"),
            f"--data.image_root={tmp_path / 'opt'}", f"--data.video_root={tmp_path / 'videos'}",
            "--trainer.max_epochs=1", "--trainer.max_steps=4", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--data.steps_per_epoch=4", "--data.val_samples=8", "--data.num_workers=2",
        ])
    assert cli.trainer.global_step == 4 and set(cli.model.tasks) == {"rp", "col", "ex", "ms"}
    assert cli.trainer.callback_metrics["train/skipped_files"].item() >= 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/rp/loss_epoch"])
    assert np.isfinite(cli.trainer.callback_metrics["val/col/ab_auc"].item())
