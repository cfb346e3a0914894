"""Screening once in a job of several ranks (gloo, 2 spawned CPU processes): only global rank 0
screens, every rank trains on the same list; a changed folder is screened again (only what
changed), an unchanged one is not."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image
from toy_tasks import Brightness

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.trunks import ResNetV2

pytestmark = pytest.mark.slow


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)  # module level: spawned processes unpickle it


class Record(pl.Callback):
    """Per rank: who screened, how many files it probed, the training and validation lists."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_start(self, trainer, module) -> None:
        dm = trainer.datamodule
        _, screening = dm._screenings.results[("images", dm.image_root)]
        record = {
            "screened_here": dm._screenings.screened_here,
            "probed": screening.probed if dm._screenings.screened_here else None,
            "train": list(dm.train_images.names),
            "val": list(dm.val_images.names),
        }
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _fit(tmp_path: Path, images: Path, run: str) -> list[dict]:
    out = tmp_path / run
    out.mkdir()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path / "run"), callbacks=[Record(str(out))],
    )
    model = MultiTaskSSL({"b": Brightness(batch_size=2, image_size=16)}, trunk=ResNetV2("tiny", width=0.125), optimizer=_sgd)
    trainer.fit(model, MultiTaskDataModule(image_root=str(images), val_fraction=0.2, steps_per_epoch=2, num_workers=0))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_only_rank_zero_screens_and_every_rank_trains_on_the_same_list(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    (images / "broken.jpg").write_text("not a jpeg")

    first = _fit(tmp_path, images, "first")
    assert [r["screened_here"] for r in first] == [True, False]
    assert first[0]["probed"] == 11
    assert first[0]["train"] == first[1]["train"] and first[0]["val"] == first[1]["val"]
    assert len(first[0]["train"]) + len(first[0]["val"]) == 10 and "broken.jpg" not in first[0]["train"] + first[0]["val"]
    assert list((tmp_path / "run" / "data-cache").glob("screen-images-header-*.npz"))  # beside the run

    unchanged = _fit(tmp_path, images, "unchanged")
    assert [r["screened_here"] for r in unchanged] == [True, False] and unchanged[0]["probed"] == 0
    assert unchanged[0]["train"] == first[0]["train"] == unchanged[1]["train"]

    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / "broken.jpg")  # repaired
    (images / "0.jpg").unlink()
    changed = _fit(tmp_path, images, "changed")
    assert changed[0]["probed"] == 1  # only the rewritten file
    assert changed[0]["train"] == changed[1]["train"] and changed[0]["val"] == changed[1]["val"]
    names = changed[0]["train"] + changed[0]["val"]
    assert "broken.jpg" in names and "0.jpg" not in names and len(names) == 10
