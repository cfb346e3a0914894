"""``MultiTaskDataModule``: one named sub-batch per task, decoded and resized on CPU workers."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from mtssl_lightning.data.batch import DataRequest, ImageBatch
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.sources import ImageFolder, ImageSource, SampleImages

log = logging.getLogger(__name__)


class MultiTaskDataModule(pl.LightningDataModule):
    """Feeds every task of a :class:`~mtssl_lightning.MultiTaskSSL` its own sub-batch.

    Each training batch is ``{task_name: ImageBatch}``: ``uint8 (B_task, 3, S_task, S_task)``
    crops made by CPU workers; the tasks then build their inputs on the device (in
    ``MultiTaskSSL.on_after_batch_transfer``). What each task needs (source, batch size, crop
    size) comes from the model's tasks (``requests``), so it is configured once, on the task.

    Args:
        image_root: folder of images (recursive, any layout, ImageNet's included); ``None``
            uses the bundled sample photos (scikit-image + scikit-learn, no download).
        val_root: separate validation folder; ``None`` splits ``val_fraction`` of
            ``image_root`` off deterministically (the sample photos have a fixed split).
        val_fraction: share of ``image_root`` held out when ``val_root`` is not given.
        steps_per_epoch: training batches per epoch (every task gets that many); ``None`` =
            one pass over the training images at the largest task batch size.
        val_samples: validation crops per task (fixed crops of the validation images, the same
            every epoch); ``None`` = one per validation image.
        min_scale: smallest random-crop area as a fraction of the image.
        num_workers: DataLoader worker processes per task loader.
        pin_memory: pin host memory; ``None`` = only when CUDA is available.
        seed: seed of the fixed validation crops.
        requests: ``{task: DataRequest}``; ``None`` = ask the attached model's tasks.
    """

    def __init__(
        self,
        image_root: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.02,
        steps_per_epoch: int | None = None,
        val_samples: int | None = None,
        min_scale: float = 0.2,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        seed: int = 0,
        requests: dict[str, DataRequest] | None = None,
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be >= 1, got {steps_per_epoch}")
        self.image_root, self.val_root, self.val_fraction = image_root, val_root, val_fraction
        self.steps_per_epoch, self.val_samples = steps_per_epoch, val_samples
        self.min_scale, self.num_workers, self.pin_memory, self.seed = min_scale, num_workers, pin_memory, seed
        self._requests = requests
        self.train_images: ImageSource | None = None
        self.val_images: ImageSource | None = None

    # ------------------------------------------------------------------ set-up
    @property
    def requests(self) -> dict[str, DataRequest]:
        """What each task needs, from the constructor or from the attached model's tasks."""
        if self._requests is not None:
            return self._requests
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if model is None or not hasattr(model, "data_requests"):
            raise RuntimeError(
                "MultiTaskDataModule does not know the tasks: attach it to a Trainer with a "
                "MultiTaskSSL model, or pass `requests={name: DataRequest(...)}`"
            )
        return model.data_requests()

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:
            return
        if self.image_root is None:
            self.train_images, self.val_images = SampleImages("train"), SampleImages("val")
        elif self.val_root is not None:
            self.train_images, self.val_images = ImageFolder(self.image_root), ImageFolder(self.val_root)
        else:
            self.train_images, self.val_images = ImageFolder(self.image_root).split(self.val_fraction)
        for name, request in self.requests.items():
            if request.source != "images":
                raise ValueError(
                    f"task {name!r} needs a {request.source!r} source, which this DataModule does not "
                    "have yet; remove the task or configure a video source"
                )
        log.info("training on %s; validating on %s", self.train_images.describe(), self.val_images.describe())

    # ------------------------------------------------------------ dataloaders
    def _loader(self, dataset: CropDataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            collate_fn=ImageBatch.collate,
        )

    def train_dataloader(self) -> CombinedLoader:
        assert self.train_images is not None, "call setup() first"
        requests = self.requests
        steps = self.steps_per_epoch or max(1, len(self.train_images) // max(r.batch_size for r in requests.values()))
        loaders = {
            name: self._loader(
                CropDataset(self.train_images, r.image_size, steps * r.batch_size, True, self.min_scale, self.seed),
                r.batch_size,
                train=True,
            )
            for name, r in requests.items()
        }
        # all loaders have exactly `steps` batches, so "max_size_cycle" never cycles
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        assert self.val_images is not None, "call setup() first"
        length = self.val_samples or len(self.val_images)
        loaders = {
            name: self._loader(
                CropDataset(self.val_images, r.image_size, length, False, self.min_scale, self.seed),
                r.batch_size,
                train=False,
            )
            for name, r in self.requests.items()
        }
        # tasks with larger batches run out first: "max_size" gives them None afterwards
        return CombinedLoader(loaders, mode="max_size")

    def test_dataloader(self) -> CombinedLoader:
        """The validation crops (the sample data and image folders have no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> CombinedLoader:
        """The validation crops, for ``mtssl predict``; one task after the other (Lightning's
        prediction loop only takes "sequential"), in the order of ``requests``."""
        loaders = self.val_dataloader().iterables
        return CombinedLoader(loaders, mode="sequential")
