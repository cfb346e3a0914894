"""VOC detection data: resized (and flipped) samples, their batches, the Dataset and the DataModule.

Images are resized on CPU workers so that the shorter side is ``image_size``; batches are
:class:`VOCBatch` (lists, since image sizes differ). The files are read by
:mod:`~mtssl_lightning.evaluation.detection.voc`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtssl_lightning.data.batch import pin_batch
from mtssl_lightning.data.loading import init_worker
from mtssl_lightning.evaluation.detection.voc import parse_voc_annotation, resolve_voc_root

log = logging.getLogger(__name__)


@dataclass
class VOCSample:
    """One image and its objects after resizing (and the training flip).

    Attributes:
        image: ``(3, H, W)`` ``uint8`` RGB, shorter side ``image_size`` (unless capped by ``max_size``).
        boxes: ``(N, 4)`` ``float32`` ``(x1, y1, x2, y2)`` in the resized image's pixel-edge coordinates.
        labels: ``(N,)`` ``int64`` in ``1..20``.
        difficult: ``(N,)`` ``bool``.
        index: position of the image in the dataset's split.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    difficult: Tensor
    index: int


@dataclass
class VOCBatch:
    """A batch of detection samples; lists because the images differ in size.

    Attributes:
        images: ``B`` tensors ``(3, H_i, W_i)`` ``uint8`` RGB (turned into floats in [0, 1] on the device).
        boxes: ``B`` tensors ``(N_i, 4)`` ``float32`` ``(x1, y1, x2, y2)`` in pixels of ``images[i]``.
        labels: ``B`` tensors ``(N_i,)`` ``int64`` in ``1..20``.
        difficult: ``B`` tensors ``(N_i,)`` ``bool``.
        index: ``(B,)`` ``int64`` position of each image in its split.
        skipped: images the worker could not decode while making this batch (each warned about
            once and left out of the batch).
    """

    images: list[Tensor]
    boxes: list[Tensor]
    labels: list[Tensor]
    difficult: list[Tensor]
    index: Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> VOCBatch:
        """The batch in pinned host memory (``DataLoader(pin_memory=True)`` calls it)."""
        return pin_batch(self)

    @staticmethod
    def collate(samples: list[VOCSample | None]) -> VOCBatch:
        """Gather samples into a batch; ``None`` (an undecodable image) is dropped and counted."""
        good = [s for s in samples if s is not None]
        return VOCBatch(
            images=[s.image for s in good],
            boxes=[s.boxes for s in good],
            labels=[s.labels for s in good],
            difficult=[s.difficult for s in good],
            index=torch.tensor([s.index for s in good], dtype=torch.int64),
            skipped=len(samples) - len(good),
        )


def resized_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """``(H', W')`` with the shorter side ``size``, shrunk further so the longer side stays ≤ ``max_size``."""
    scale = size / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class VOCDetectionDataset(Dataset):
    """A PASCAL VOC split (``ImageSets/Main/<split>.txt``) with every annotation parsed up front.

    Args:
        root: the ``VOC<year>`` folder or a folder above it (see :func:`resolve_voc_root`).
        split: name of the image-set file (``trainval``, ``test``, ``train``, ``val``).
        image_size: shorter side after resizing (pixels).
        max_size: cap on the longer side after resizing (``None``: no cap).
        hflip: flip each image (and its boxes) horizontally with probability 1/2 (training).
        year: the ``VOC<year>`` folder name.

    Raises:
        FileNotFoundError: the VOC folder, the split file, an annotation or an image file is
            missing (the message names the path).
        ValueError: an annotation is malformed (see :func:`parse_voc_annotation`) or the split is empty.

    Item ``i`` is a :class:`VOCSample`, or ``None`` when the image cannot be decoded (warned
    about once; :meth:`VOCBatch.collate` drops and counts it).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "trainval",
        image_size: int = 600,
        max_size: int | None = 1000,
        hflip: bool = False,
        year: str = "2007",
    ) -> None:
        self.voc_root = resolve_voc_root(root, year)
        split_file = self.voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            main = self.voc_root / "ImageSets" / "Main"
            found = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
            raise FileNotFoundError(
                f"VOC split file {str(split_file)!r} does not exist; splits found there: {found or 'none'}. "
                "(The `test` split comes with the separate VOC2007 test archive, extracted into the same VOCdevkit.)"
            )
        self.ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise ValueError(f"VOC split file {str(split_file)!r} lists no images")
        self.split, self.image_size, self.max_size, self.hflip = split, image_size, max_size, hflip
        self.image_paths = [self.voc_root / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        missing = [str(p) for p in self.image_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of split {split!r} missing from {str(self.voc_root / 'JPEGImages')!r}, "
                f"e.g. {missing[:3]}; is the dataset fully extracted?"
            )
        # parsed once here, so bad annotations fail at set-up rather than hours into training
        self.annotations = [parse_voc_annotation(self.voc_root / "Annotations" / f"{i}.xml") for i in self.ids]
        self.bad: set[int] = set()  # per worker process: images that failed to decode

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> VOCSample | None:
        path = self.image_paths[index]
        if index in self.bad:
            return None
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except Exception as err:  # noqa: BLE001 - any decoder error means "skip this file"
            self.bad.add(index)
            warnings.warn(f"skipping unreadable VOC image {str(path)!r}: {err}", stacklevel=2)
            return None
        ann = self.annotations[index]
        height, width = resized_shape(image.height, image.width, self.image_size, self.max_size)
        scale = torch.tensor([width / image.width, height / image.height] * 2, dtype=torch.float32)
        image = image.resize((width, height), Image.BILINEAR)  # PIL filters (antialiases) when shrinking
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        boxes = ann.boxes * scale
        if self.hflip and bool(torch.rand(()) < 0.5):  # torch's RNG: seeded per worker and by seed_everything
            pixels = pixels.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return VOCSample(
            image=pixels, boxes=boxes, labels=ann.labels.clone(), difficult=ann.difficult.clone(), index=index
        )


class VOCDetectionDataModule(pl.LightningDataModule):
    """PASCAL VOC detection data: train on ``train_split``, validate on ``val_split``, test on ``test_split``.

    Args:
        root: the ``VOCdevkit`` folder (or ``VOC2007`` itself, or the folder above ``VOCdevkit``).
        year: ``VOC<year>`` folder to read.
        train_split, val_split: image-set names (``ImageSets/Main/<name>.txt``). VOC07 papers
            train on ``trainval`` and report on ``test``.
        test_split: image set of ``mtssl test`` (default: ``val_split``).
        image_size: shorter image side after resizing (Faster R-CNN on VOC: 600).
        max_size: cap on the longer side (Faster R-CNN on VOC: 1000).
        batch_size: images per step (and per evaluation batch).
        num_workers: DataLoader workers (decoding and resizing happen there).
        hflip: random horizontal flips for training.
    """

    def __init__(
        self,
        root: str = "data/VOCdevkit",
        year: str = "2007",
        train_split: str = "trainval",
        val_split: str = "test",
        test_split: str | None = None,
        image_size: int = 600,
        max_size: int | None = 1000,
        batch_size: int = 2,
        num_workers: int = 4,
        hflip: bool = True,
    ) -> None:
        super().__init__()
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"`image_size` and `batch_size` must be positive and `num_workers` >= 0, got "
                f"{image_size}, {batch_size}, {num_workers}"
            )
        self.root, self.year = root, year
        self.train_split, self.val_split = train_split, val_split
        self.test_split = val_split if test_split is None else test_split
        self.image_size, self.max_size = image_size, max_size
        self.batch_size, self.num_workers, self.hflip = batch_size, num_workers, hflip
        self.datasets: dict[str, VOCDetectionDataset] = {}

    def _dataset(self, split: str, train: bool) -> VOCDetectionDataset:
        key = f"{split}/{'train' if train else 'eval'}"
        if key not in self.datasets:
            self.datasets[key] = VOCDetectionDataset(
                self.root, split, self.image_size, self.max_size, hflip=train and self.hflip, year=self.year
            )
            log.info("VOC%s %s: %d images", self.year, split, len(self.datasets[key]))
        return self.datasets[key]

    def setup(self, stage: str | None = None) -> None:
        # built (and every annotation checked) before any step runs
        if stage in (None, "fit"):
            self._dataset(self.train_split, True)
        if stage in (None, "fit", "validate"):
            self._dataset(self.val_split, False)
        if stage in (None, "test"):
            self._dataset(self.test_split, False)

    def _loader(self, dataset: VOCDetectionDataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=VOCBatch.collate,
            worker_init_fn=init_worker,  # workers ignore SIGTERM: the pre-emption checkpoint is saved first
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.train_split, True), True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.val_split, False), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.test_split, False), False)
